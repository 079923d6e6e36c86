"""Central, deterministic pre-training of the base dual encoder on the held-out split,
cached on disk by a hash of what determines it: raysim's tiny CLIP, or the MiniLM dual
encoder's image tower aligned to its locked text tower. LoRA on a random tiny CLIP stays
at chance, so federated runs start from this base."""
from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch
from filelock import FileLock

from models.clip import build_tiny_clip, contrastive_loss, tiny_clip_config
from raysim.cache import cache_root
from raysim.config import ExperimentConfig, MiniLMBaseConfig
from raysim.data import BOS, EOS, PAD, FederatedData, data_key


def base_config(cfg: ExperimentConfig, data: FederatedData):
    m = cfg.model
    return tiny_clip_config(
        vocab_size=data.tokenizer.vocab_size,
        max_text_len=m.max_text_len,
        image_size=cfg.data.image_size,
        patch_size=m.patch_size,
        hidden_size=m.hidden_size,
        num_layers=m.num_layers,
        num_heads=m.num_heads,
        intermediate_size=m.intermediate_size,
        projection_dim=m.projection_dim,
        pad_token_id=PAD,
        bos_token_id=BOS,
        eos_token_id=EOS,
    )


def pretrain_key(cfg: ExperimentConfig) -> str:
    # The base depends on the model, the data split and the pre-training recipe, and on the
    # seed; not on rounds, clients, LoRA or runtime.
    d = cfg.to_dict()
    sub = {k: d[k] for k in ("model", "pretrain", "seed")}
    sub["data"] = data_key(cfg)
    return hashlib.sha256(json.dumps(sub, sort_keys=True).encode()).hexdigest()[:16]


def train_base(cfg: ExperimentConfig, data: FederatedData, log=print):
    """Full-parameter CLIP-loss training on the pretrain split; deterministic for a seed."""
    p = cfg.pretrain
    model = build_tiny_clip(base_config(cfg, data), seed=cfg.seed)
    if not p.enabled:
        return model
    # One torch thread whatever the caller uses: float sums differ with the thread count, and
    # over many epochs so does the base (one recipe measured 0.635 vs 0.671 zero-shot at 1 vs
    # 2 threads). The cache is keyed by the config only, so the base must not depend on more.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train(model, cfg, data, log)
    finally:
        torch.set_num_threads(threads)


def _train(model, cfg: ExperimentConfig, data: FederatedData, log):
    p = cfg.pretrain
    split = data.pretrain
    opt = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=p.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    t0 = time.perf_counter()
    for epoch in range(p.epochs):
        order = torch.randperm(len(split), generator=gen)
        for start in range(0, len(order), p.batch_size):
            b = order[start : start + p.batch_size]
            if len(b) < 2:
                continue
            loss = contrastive_loss(model, split.images[b], split.input_ids[b], split.attention_mask[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        if epoch == p.epochs - 1 or epoch % 5 == 0:
            log(f"pretrain epoch {epoch + 1}/{p.epochs} loss {loss.item():.3f} ({time.perf_counter() - t0:.1f}s)")
    model.eval()
    return model


def pretrained_base_dir(cfg: ExperimentConfig, data: FederatedData | None = None, log=print) -> Path:
    """Directory of the cached base checkpoint (save_pretrained format), built if missing."""
    if cfg.model.kind == "pretrained":
        path = Path(cfg.model.path)
        if not (path / "config.json").is_file():
            from raysim.config import ConfigError

            raise ConfigError(
                f"model.path {path} is not a Hugging Face checkpoint directory (no config.json there); "
                "point it at a directory written by save_pretrained"
            )
        return path

    def build(tmp: Path) -> None:
        model = train_base(cfg, data if data is not None else FederatedData(cfg), log=log)
        model.save_pretrained(str(tmp), safe_serialization=True)

    return _cached(cache_root() / "pretrain" / pretrain_key(cfg), build)


def minilm_base_key(cfg: ExperimentConfig, minilm: MiniLMBaseConfig) -> str:
    d = cfg.to_dict()
    sub = {"minilm": minilm.model_dump(), "pretrain": d["pretrain"], "seed": cfg.seed,
           "max_text_len": cfg.model.max_text_len}
    sub["data"] = {k: d["data"][k] for k in ("dataset", "image_size", "test_fraction", "pretrain_class_share")}
    return hashlib.sha256(json.dumps(sub, sort_keys=True).encode()).hexdigest()[:16]


def train_minilm_base(cfg: ExperimentConfig, m: MiniLMBaseConfig, data: FederatedData, log=print):
    """The MiniLM dual encoder (lora.base: minilm) with its new image tower aligned to the
    locked MiniLM text tower on the pre-training split (`data` tokenized by MiniLM's tokenizer)."""
    from models.minilm import align_image_tower, build_minilm_dual_encoder, image_tower_config

    vision = image_tower_config(m.image_tower, image_size=cfg.data.image_size, patch_size=m.patch_size,
                                hidden_size=m.hidden_size, num_layers=m.num_layers, num_heads=m.num_heads,
                                intermediate_size=m.intermediate_size)
    model = build_minilm_dual_encoder(vision, m.projection_dim, cfg.seed)
    p, split = cfg.pretrain, data.pretrain
    if not p.enabled:
        return model
    return align_image_tower(model, split.images, split.input_ids, split.attention_mask, epochs=p.epochs,
                             batch_size=p.batch_size, lr=p.lr, weight_decay=p.weight_decay, seed=cfg.seed, log=log)


def minilm_base_dir(cfg: ExperimentConfig, m: MiniLMBaseConfig, data: FederatedData, log=print) -> Path:
    """Directory of the cached MiniLM base (with its tokenizer), built if missing."""
    from models.minilm import load_minilm_tokenizer, save_with_tokenizer

    def build(tmp: Path) -> None:
        save_with_tokenizer(train_minilm_base(cfg, m, data, log), tmp, load_minilm_tokenizer())

    return _cached(cache_root() / "fedlarge-minilm" / minilm_base_key(cfg, m), build)


def _cached(target: Path, build) -> Path:
    """`target`, built by `build(tmp_dir)` once across processes (a file lock) and renamed into
    place atomically: readers see a complete checkpoint or none."""
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        try:
            build(tmp)
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
