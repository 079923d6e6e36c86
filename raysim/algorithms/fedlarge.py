"""FedLarge: enterprises jointly fine-tune a large VLM ("Federated Learning in Big Model
Era: Domain-Specific Multimodal Large Models", Li et al. 2023, raysim's reading).

FedAvg of LoRA adapters on a frozen dual-encoder VLM, plus the three things the paper
asks of a platform for large models and enterprise clients:

- efficient local training: a DeepSpeed ZeRO-2/3 backend inside the client worker
  (torch optimizer, gloo on CPU / nccl on GPU), bf16/fp16 autocast, gradient
  checkpointing, LoRA on chosen modules only;
- data quality from the model itself: before a client first trains (and every
  `quality_every` rounds) the current global model, frozen, scores each local
  image-caption pair; low scorers are dropped (`filter`) or down-weighted (`weight`);
- contribution scores as the incentive hook: each round, the cosine between a client's
  update and the aggregate update (the gradient-similarity approximation of Shapley
  values of CGSV, Xu et al. 2021), written to the round's metrics and the summary.

The base is either the run's `model` section (tiny CLIP pre-trained by raysim, or any
checkpoint directory at `model.path`) or, with `options.base: minilm`, a dual encoder
whose text tower is the pretrained all-MiniLM-L6-v2 (models/minilm.py) and whose image
tower and projections are first aligned to it centrally on the pre-training split
(text tower locked), cached like raysim's other pre-trained bases.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
import torch
import torch.nn.functional as F
from filelock import FileLock
from pydantic import BaseModel, ConfigDict, Field, model_validator

from actors.protocol import Broadcast, ClientContext, ClientResult, Tensors
from models.lora import activate, adapter_state, add_lora, load_adapter_state, lora_config, save_adapter
from models.lora import trainable_parameters
from models.minilm import (
    build_minilm_dual_encoder,
    enable_gradient_checkpointing,
    image_tower_config,
    load_minilm_tokenizer,
    load_vlm,
    load_vlm_tokenizer,
    mean_pool,
    save_with_tokenizer,
)
from raysim.aggregate import weighted as agg
from raysim import vlm_lora
from raysim.algorithms import options_of
from raysim.algorithms.common import FromConfig
from raysim.config import ExperimentConfig
from raysim.data import FederatedData, PairData
from raysim.pretrain import cache_root, pretrained_base_dir


# --- options -------------------------------------------------------------------------

class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class MiniLMBase(_Strict):
    """The image tower of the MiniLM dual encoder (the text tower is fixed: MiniLM-L6)."""

    image_tower: Literal["vit", "resnet"] = "vit"
    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(128, ge=8)
    patch_size: int = Field(8, ge=1)
    projection_dim: int = Field(64, ge=4)


class CaptionNoise(_Strict):
    """Simulated low-quality data: `fraction` of the listed clients' pairs get another
    pair's caption (a permutation among those pairs)."""

    clients: list[int] = Field(default_factory=list)
    fraction: float = Field(0.3, ge=0, le=1)


class Options(_Strict):
    base: Literal["config", "minilm"] = "config"
    minilm: MiniLMBase = MiniLMBase()
    # Local training: plain torch, or DeepSpeed ZeRO inside the client worker.
    backend: Literal["torch", "deepspeed"] = "torch"
    zero_stage: Literal[2, 3] = 2
    offload: Literal["none", "optimizer", "optimizer_and_params"] = "none"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast dtype of forward passes
    # deepspeed: ranks per client. Above 1 a client's local training runs in that many Ray
    # actors (one placement group on one node), each with these resources.
    world_size: int = Field(1, ge=1)
    rank_num_cpus: float = Field(1.0, gt=0)
    rank_num_gpus: int = Field(0, ge=0, description="GPUs per rank; > 0: nccl, else gloo on CPU")
    gradient_checkpointing: bool = False
    # A text tower without trainable weights (base minilm; LoRA not on query/value) is
    # locked, as in LiT: inference mode (no dropout), and with the torch backend its
    # features of each client's captions are computed once per worker and reused, so
    # training runs only the image tower and the projections. False: the frozen tower runs
    # in train mode (dropout on) inside every forward pass.
    lock_text_tower: bool = True
    # Data quality: scores from the frozen current global model.
    quality: Literal["none", "filter", "weight"] = "none"
    quality_every: int = Field(0, ge=0, description="re-score every K rounds; 0 = only before the first training")
    filter_fraction: float = Field(0.3, ge=0, lt=1, description="filter: drop this lowest-scoring share")
    filter_threshold: Optional[float] = Field(None, description="filter: drop pairs below this instead (see quality_weights)")
    weight_temperature: float = Field(0.05, gt=0, description="weight: sigmoid((score - cut) / T)")
    # Contribution: cosine of each client's update with the aggregate update.
    contribution: Literal["none", "gradient"] = "gradient"
    contribution_sketch_dim: int = Field(65536, ge=16, description="count-sketch size; exact below it")
    caption_noise: CaptionNoise = CaptionNoise()

    @model_validator(mode="after")
    def _check(self) -> "Options":
        if self.offload == "optimizer_and_params" and self.zero_stage != 3:
            raise ValueError("offload 'optimizer_and_params' needs zero_stage 3 (ZeRO-2 does not partition weights)")
        if self.backend == "deepspeed" and self.precision == "fp16":
            raise ValueError("backend deepspeed runs fp32 master weights with autocast; use precision bf16, not fp16")
        if self.world_size > 1 and self.backend != "deepspeed":
            raise ValueError("world_size > 1 (a client spread over several ranks) needs backend 'deepspeed'")
        return self


# --- data ----------------------------------------------------------------------------

class HFTokenizer:
    """A Hugging Face tokenizer behind raysim's tokenizer call: texts -> (ids, mask),
    padded to a fixed length so that identical captions have identical rows."""

    def __init__(self, tokenizer, max_len: int):
        self.tokenizer = tokenizer
        self.max_len = max_len

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_len, return_tensors="pt")
        return out["input_ids"], out["attention_mask"]


def noisy_rows(data: FederatedData, noise: CaptionNoise, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows (into data.all) whose captions are replaced, and the rows they take them from.
    Deterministic from the seed, so the driver and every worker agree."""
    rng = np.random.default_rng([seed, 0xCA9])
    targets, sources = [], []
    for c in sorted(noise.clients):
        rows = data.client_partition[c]
        n = int(round(noise.fraction * len(rows)))
        if n < 2:
            continue
        picked = rng.choice(rows, size=n, replace=False)
        targets.append(picked)
        sources.append(np.roll(picked, 1))  # a cyclic shift: no row keeps its own caption
    if not targets:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(targets), np.concatenate(sources)


def build_data(cfg: ExperimentConfig, opts: Options, tokenizer) -> FederatedData:
    data = FederatedData(cfg)
    if tokenizer is not None:  # the checkpoint's own tokenizer replaces the word tokenizer
        data.tokenizer = HFTokenizer(tokenizer, cfg.model.max_text_len)
        ids, mask = data.tokenizer(data.captions)
        data.all = PairData(data.all.images, data.all.labels, ids, mask)
    targets, sources = noisy_rows(data, opts.caption_noise, cfg.seed)
    if len(targets):
        a = data.all
        ids, mask = a.input_ids.clone(), a.attention_mask.clone()
        ids[targets], mask[targets] = a.input_ids[sources], a.attention_mask[sources]
        data.all = PairData(a.images, a.labels, ids, mask)
    # A pair is wrong when its caption names another digit (a shuffle can keep the digit).
    data.mismatched = np.zeros(len(data.all), bool)
    data.mismatched[targets] = data.all.labels.numpy()[sources] != data.all.labels.numpy()[targets]
    return data


# --- the MiniLM base: align a fresh image tower to the locked MiniLM text tower ---------

def minilm_base_key(cfg: ExperimentConfig, opts: Options) -> str:
    d = cfg.to_dict()
    sub = {"minilm": opts.minilm.model_dump(), "pretrain": d["pretrain"], "seed": cfg.seed,
           "max_text_len": cfg.model.max_text_len}
    sub["data"] = {k: d["data"][k] for k in ("dataset", "image_size", "test_fraction", "pretrain_class_share")}
    return hashlib.sha256(json.dumps(sub, sort_keys=True).encode()).hexdigest()[:16]


def pretrain_minilm_base(cfg: ExperimentConfig, opts: Options, data: FederatedData, log=print):
    """CLIP loss on the pre-training split, training the image tower, both projections and
    the temperature. The text tower stays locked, so its mean-pooled features are
    computed once per caption (LiT with the roles swapped: locked text, tuned image)."""
    m = opts.minilm
    vision = image_tower_config(m.image_tower, image_size=cfg.data.image_size, patch_size=m.patch_size,
                                hidden_size=m.hidden_size, num_layers=m.num_layers, num_heads=m.num_heads,
                                intermediate_size=m.intermediate_size)
    model = build_minilm_dual_encoder(vision, m.projection_dim, cfg.seed)
    p, split = cfg.pretrain, data.pretrain
    if not p.enabled:
        return model
    with torch.no_grad():
        ids, mask = split.input_ids, split.attention_mask
        pooled = torch.cat([
            mean_pool(model.text_model(input_ids=ids[s:s + 256], attention_mask=mask[s:s + 256]).last_hidden_state,
                      mask[s:s + 256])
            for s in range(0, len(split), 256)
        ])
    for param in model.text_model.parameters():
        param.requires_grad_(False)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=p.lr, weight_decay=p.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    model.train()
    t0 = time.perf_counter()
    for epoch in range(p.epochs):
        for b in torch.randperm(len(split), generator=gen).split(p.batch_size):
            if len(b) < 2:
                continue
            img = F.normalize(model.embed_image(split.images[b])[1], dim=-1)
            txt = F.normalize(model.text_projection(pooled[b]), dim=-1)
            logits = model.logit_scale.exp() * img @ txt.T
            target = torch.arange(len(b))
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if epoch == p.epochs - 1 or epoch % 5 == 0:
            log(f"minilm base epoch {epoch + 1}/{p.epochs} loss {loss.item():.3f} ({time.perf_counter() - t0:.1f}s)")
    model.eval()
    return model


def minilm_base_dir(cfg: ExperimentConfig, opts: Options, data: FederatedData, log=print) -> Path:
    target = cache_root() / "fedlarge-minilm" / minilm_base_key(cfg, opts)
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(target) + ".lock"):
        if (target / "config.json").is_file():
            return target
        model = pretrain_minilm_base(cfg, opts, data, log)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
        try:
            save_with_tokenizer(model, tmp, load_minilm_tokenizer())
            tmp.rename(target)  # atomic: readers see a complete checkpoint or none
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


# --- local training backends -----------------------------------------------------------

def free_port() -> int:
    """A port the OS says is free, so every worker process rendezvous on its own port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_deepspeed_process_group(device: torch.device) -> None:
    """A one-process group per worker (this client's data-parallel world is one rank)."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)


def promote_scalar_parameters(model: torch.nn.Module) -> None:
    """DeepSpeed 0.19 broadcasts every parameter through `.view(torch.uint8)`, which fails
    for 0-dim tensors (CLIP's logit_scale); a 1-element vector behaves the same in the
    model's arithmetic."""
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.dim() == 0:
                setattr(module, name, torch.nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad))


def deepspeed_config(opts: Options, batch_size: int) -> dict:
    zero: dict[str, Any] = {"stage": opts.zero_stage}
    if opts.offload != "none":
        zero["offload_optimizer"] = {"device": "cpu"}
    if opts.offload == "optimizer_and_params":
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # our torch AdamW: no DeepSpeed op to compile
        "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0; the torch backend does not clip
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # With offload DeepSpeed insists on its CPU Adam, which compiles a C++ op at first
        # use; torch's AdamW on the CPU copy is slower per step but needs nothing compiled.
        "zero_force_ds_cpu_optimizer": False,
    }


class TorchTrainer:
    """Plain torch: AdamW over the adapter's parameters, fresh or with the client's moments."""

    def __init__(self, model, name: str, opts: Options, device: torch.device):
        self.model, self.name, self.device = model, name, device
        self.scaler = torch.amp.GradScaler(device.type, enabled=opts.precision == "fp16")
        self.opt = None

    def forward(self, **batch):
        return self.model(**batch)

    def start(self, adapter: Tensors, lr: float, weight_decay: float, moments: Tensors | None) -> None:
        activate(self.model, self.name)
        load_adapter_state(self.model, self.name, adapter)
        self.opt = torch.optim.AdamW(trainable_parameters(self.model), lr=lr, weight_decay=weight_decay)
        if moments:
            vlm_lora._load_optimizer_state(self.opt, moments)

    def step(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()

    def finish(self) -> tuple[Tensors, Tensors]:
        return adapter_state(self.model, self.name), vlm_lora._flat_optimizer_state(self.opt)

    def train(self, mode: bool) -> None:
        self.model.train(mode)
        keep_locked_tower_in_eval(self.model)


class DeepSpeedTrainer:
    """One DeepSpeed engine per worker, built on first use and reused by every client the
    worker serves: each client loads its start adapter into the (gathered) parameters,
    DeepSpeed's fp32 master copy is refreshed from them and the AdamW moments start
    fresh, or, with train.keep_optimizer_state, from the client's own moments of its last
    training. ZeRO's AdamW runs over flat fp32 partitions (one per parameter group and
    rank), so those moments are flat too: elementwise the same numbers as the torch
    backend's per-tensor moments, in a layout fixed by the model, ZeRO stage and world
    size, which cannot change within a run (--resume keeps algorithm options)."""

    def __init__(self, model, name: str, opts: Options, device: torch.device, lr: float, weight_decay: float,
                 batch_size: int):
        import deepspeed

        init_deepspeed_process_group(device)
        promote_scalar_parameters(model)
        activate(model, name)
        params = trainable_parameters(model)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        self.engine, self.zero_opt, _, _ = deepspeed.initialize(
            model=model, optimizer=opt, model_parameters=params, config=deepspeed_config(opts, batch_size)
        )
        self.name = name
        self.stage3 = opts.zero_stage == 3

    def _gathered(self, modify: bool):
        """Under ZeRO-3 the adapter's parameters are partitioned; gather them (only them)
        to read or write their full values."""
        import deepspeed

        params = trainable_parameters(self.engine.module)
        return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None, enabled=self.stage3)

    @property
    def _inner_optimizer(self) -> torch.optim.Optimizer:
        return self.zero_opt.optimizer  # the torch AdamW over DeepSpeed's fp32 partitions

    def forward(self, **batch):
        return self.engine(**batch)

    def start(self, adapter: Tensors, lr: float, weight_decay: float, moments: Tensors | None) -> None:
        with self._gathered(modify=True):
            load_adapter_state(self.engine.module, self.name, adapter)
        self.zero_opt.refresh_fp32_params()
        opt = self._inner_optimizer
        opt.state.clear()  # fresh moments, or this client's own (train.keep_optimizer_state)
        for i, flat in enumerate(self._partitions() if moments else []):
            opt.state[flat] = {name: (v.clone() if name == "step" else v.to(flat.device, flat.dtype, copy=True))
                               for name, v in ((k.rsplit(".", 1)[1], v) for k, v in moments.items()
                                               if k.startswith(f"optim.{i}."))}

    def step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()

    def finish(self) -> tuple[Tensors, Tensors]:
        with self._gathered(modify=False):
            adapter = adapter_state(self.engine.module, self.name)
        state = self._inner_optimizer.state
        moments = {f"optim.{i}.{name}": torch.as_tensor(v).detach().to("cpu", copy=True)
                   for i, flat in enumerate(self._partitions()) for name, v in state.get(flat, {}).items()}
        return adapter, moments

    def _partitions(self) -> list[torch.Tensor]:
        """This rank's flat fp32 partitions, one per parameter group: the tensors ZeRO's
        AdamW keys its state by (ZeRO-3 hands them to the optimizer only inside step)."""
        z = self.zero_opt
        return list(z.fp32_partitioned_groups_flat if self.stage3 else z.single_partition_of_fp32_groups)

    def train(self, mode: bool) -> None:
        self.engine.train(mode)
        keep_locked_tower_in_eval(self.engine.module)


def mark_locked_text_tower(base) -> None:
    """Lock a MiniLM dual encoder's text tower unless LoRA (or modules_to_save) put
    trainable weights in it."""
    base.raysim_locked_text = not any(p.requires_grad for p in base.text_model.parameters())


def locked_text_tower(model) -> torch.nn.Module | None:
    """The text tower of a MiniLM dual encoder when it has no trainable weights and the
    option lock_text_tower is on (marked by FedLarge.build_resident), else None."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return base.text_model if getattr(base, "raysim_locked_text", False) else None


def keep_locked_tower_in_eval(model) -> None:
    tower = locked_text_tower(model)
    if tower is not None:
        tower.eval()


@torch.no_grad()
def locked_text_features(model, data: PairData, batch_size: int, device: torch.device) -> torch.Tensor:
    """The locked text tower's pooled features of `data`'s captions, (N, hidden), on the CPU."""
    base = model.get_base_model()
    out = [base.pool_text(data.input_ids[i:i + batch_size].to(device), data.attention_mask[i:i + batch_size].to(device))[1]
           for i in range(0, len(data), batch_size)]
    return torch.cat(out).cpu()


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def weighted_clip_loss(logits_per_image: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where pair i's two terms count `weights[i]` (all ones: the CLIP loss)."""
    target = torch.arange(len(logits_per_image), device=logits_per_image.device)
    per_pair = (F.cross_entropy(logits_per_image, target, reduction="none")
                + F.cross_entropy(logits_per_image.T, target, reduction="none")) / 2
    return (per_pair * weights).sum() / weights.sum()


def _batch(data: PairData, rows, device, text_features: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    if text_features is not None:  # a locked text tower's features: the tower is not run
        return {"pixel_values": data.images[rows].to(device), "text_features": text_features[rows].to(device)}
    return {"pixel_values": data.images[rows].to(device), "input_ids": data.input_ids[rows].to(device),
            "attention_mask": data.attention_mask[rows].to(device)}


def train_batches(trainer, data: PairData, weights: torch.Tensor, seed: int, train, device: torch.device,
                  precision: str, rank: int = 0, world_size: int = 1, logit_scale=None,
                  text_features: torch.Tensor | None = None) -> list[float]:
    """A client's local epochs; the batches are drawn from the seed. `text_features`: the
    locked text tower's features of `data`'s rows (computed once; see locked_text_features).
    With world_size > 1
    this is one rank of the client's group: every rank draws the same batches, forwards
    its contiguous share of each (shard_rows) and computes the whole batch's loss from the
    gathered embeddings (group_logits), so the group takes the one-process step."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout masks: the same in either backend (with one rank)
    trainer.train(True)
    losses = []
    for _ in range(train.local_epochs):
        for b in torch.randperm(len(data), generator=gen).split(train.batch_size):
            if len(b) < 2:  # a contrastive loss needs at least one negative
                continue
            rows = b if world_size == 1 else shard_rows(b, rank, world_size)
            with autocast(device, precision):
                out = trainer.forward(**_batch(data, rows, device, text_features))
            if world_size == 1:
                logits = out.logits_per_image.float()
            else:
                logits = group_logits(out, len(b), logit_scale, check=precision == "fp32")
            loss = weighted_clip_loss(logits, weights[b].to(device))
            trainer.step(loss)
            losses.append(loss.item())
    trainer.train(False)
    return losses


# --- a client over several ranks (algorithm.options.world_size > 1) ----------------------

def shard_rows(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's rows of a batch: contiguous chunks of ceil(n / N) rows, the last
    chunk(s) padded with the batch's last row, so every rank forwards the same number of
    rows (all_gather needs equal sizes) and the gathered rows [:n] are the batch in order.
    The padding rows' embeddings are dropped before the loss: they get no gradient."""
    chunk = -(-len(batch) // world_size)
    padded = torch.cat([batch, batch[-1:].expand(chunk * world_size - len(batch))])
    return padded[rank * chunk:(rank + 1) * chunk]


class _GatherRows(torch.autograd.Function):
    """all_gather along rows with a gradient: every rank computes the same loss from the
    gathered rows, so the gradient of its own rows is the sum over ranks of the gathered
    gradient's slice (an all_reduce; gloo has no reduce_scatter). DeepSpeed then averages
    the parameter gradients over the N ranks: sum over ranks of N x (1/N) x each rank's
    part = the one-process gradient of the whole batch."""

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), len(x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def group_logits(out, n: int, logit_scale: tuple[torch.Tensor, Optional[torch.Tensor]], check: bool = False):
    """Logits of the whole batch (n rows) from this rank's model output: the gathered,
    normalised image and text embeddings with the model's own formula,
    logits_per_text = text @ image.T * exp(logit_scale) (+ logit_bias: SigLIP). With
    `check`, this rank's block must equal the logits the model computed itself."""
    img = _GatherRows.apply(out.image_embeds.float())
    txt = _GatherRows.apply(out.text_embeds.float())
    scale, bias = logit_scale
    per_text = txt @ img.T * scale.to(txt.device)
    if bias is not None:
        per_text = per_text + bias.to(txt.device)
    if check:
        import torch.distributed as dist

        k = len(out.image_embeds)
        r = dist.get_rank() * k
        own = out.logits_per_image.float()
        if not torch.allclose(per_text.T[r:r + k, r:r + k], own, rtol=1e-4, atol=1e-4 * float(scale.max())):
            raise RuntimeError("algorithm.options.world_size > 1 needs a dual encoder whose logits are "
                               "text_embeds @ image_embeds.T * exp(logit_scale) (+ logit_bias); this model's differ")
    return per_text[:n, :n].T


def frozen_logit_scale(model) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """exp(logit_scale) and logit_bias of the base, read before DeepSpeed partitions them
    (ZeRO-3). LoRA leaves them frozen, so they are constants of the run."""
    base = model.get_base_model()
    scale, bias = base.logit_scale, getattr(base, "logit_bias", None)
    for p in (scale, bias):
        if isinstance(p, torch.nn.Parameter) and p.requires_grad:
            raise ValueError("algorithm.options.world_size > 1 needs logit_scale/logit_bias frozen")
    return scale.detach().exp().clone(), None if bias is None else bias.detach().clone()


class GroupRank:
    """One rank of a client's group, inside a Ray actor (actors/rank_group.py): its own
    copy of the base with the adapter and a DeepSpeed engine over the group's world. The
    coordinator (the client's worker) sends each client's start adapter, kept rows and
    their weights; every rank trains on its share; rank 0 returns the adapter."""

    def __init__(self, algo: "FedLarge", rank: int, world_size: int):
        self.algo, self.rank, self.world_size = algo, rank, world_size
        device = "cuda" if algo.opts.rank_num_gpus else "cpu"
        self.res = algo.build_resident(device)
        self.logit_scale = frozen_logit_scale(self.res.model)
        self.trainer = algo._trainer(self.res)  # DeepSpeed over the group torch.distributed already joined

    def train_client(self, adapter: Tensors, client_id: int, rows: torch.Tensor, weights: torch.Tensor, seed: int,
                     moments: Tensors | None):
        t, o = self.algo.cfg.train, self.algo.opts
        prefix = f"rank{self.rank}."  # the coordinator keeps every rank's optimizer partition
        mine = {k[len(prefix):]: v for k, v in (moments or {}).items() if k.startswith(prefix)}
        self.trainer.start(adapter, t.lr, t.weight_decay, mine or None)
        data = self.res.data.client(client_id).subset(rows)
        losses = train_batches(self.trainer, data, weights, seed, t, self.res.device, o.precision,
                               self.rank, self.world_size, self.logit_scale)
        tensors, moments = self.trainer.finish()
        return (tensors if self.rank == 0 else None), moments, losses


# --- data quality --------------------------------------------------------------------

@torch.no_grad()
def pair_scores(forward, data: PairData, batch_size: int, device: torch.device, precision: str = "fp32",
                text_features: torch.Tensor | None = None) -> torch.Tensor:
    """Each pair's image-caption cosine minus the image's mean cosine to the other local
    captions. The subtraction removes a per-image offset (some images sit closer to all
    text than others), so the score asks "is this caption better than a random one for
    this image?", which is what a shuffled caption fails. `text_features`: a locked text
    tower's features of `data`'s captions (the tower is then not run)."""
    img, txt = [], []
    for s in range(0, len(data), batch_size):
        with autocast(device, precision):
            out = forward(**_batch(data, slice(s, s + batch_size), device, text_features))
        img.append(F.normalize(out.image_embeds.float(), dim=-1).cpu())
        txt.append(F.normalize(out.text_embeds.float(), dim=-1).cpu())
    img, txt = torch.cat(img), torch.cat(txt)
    sim = img @ txt.T
    own = sim.diagonal()
    if len(data) < 2:
        return own
    return own - (sim.sum(1) - own) / (len(data) - 1)


def quality_weights(scores: torch.Tensor, opts: Options) -> torch.Tensor:
    """Per-pair weights from quality scores: 0/1 for `filter`, in (0, 1] for `weight`.
    The cut is `filter_threshold` when set -- 0 means "drop a pair whose caption fits its
    image no better than the average other local caption" (pair_scores), a rule that
    drops only what the model calls mismatched and leaves a clean client nearly whole --
    else the client's `filter_fraction` quantile, which drops that share of every client."""
    if opts.quality == "none" or len(scores) == 0:
        return torch.ones_like(scores)
    cut = (torch.tensor(opts.filter_threshold) if opts.filter_threshold is not None
           else torch.quantile(scores, opts.filter_fraction))
    if opts.quality == "filter":
        keep = scores >= cut
        if keep.sum() < 2:  # a contrastive batch needs two pairs; keep the two best
            keep = torch.zeros_like(keep)
            keep[scores.topk(min(2, len(scores))).indices] = True
        return keep.float()
    return torch.sigmoid((scores - cut) / opts.weight_temperature)


# --- contribution (gradient similarity) --------------------------------------------------

class CountSketch:
    """A linear map of a flattened adapter to `dim` numbers that keeps inner products in
    expectation (each coordinate goes to a hashed bucket with a hashed sign); exact
    (identity) when the adapter has no more than `dim` entries. Linear, so the sketch of
    an update is sketch(result) - sketch(reference)."""

    def __init__(self, template: Tensors, dim: int, seed: int):
        self.keys = sorted(template)
        self.total = sum(template[k].numel() for k in self.keys)
        self.dim = dim
        self.exact = self.total <= dim
        if not self.exact:
            gen = torch.Generator().manual_seed(seed)
            self.bucket = torch.randint(0, dim, (self.total,), generator=gen)
            self.sign = torch.randint(0, 2, (self.total,), generator=gen).float() * 2 - 1

    def __call__(self, tensors: Tensors) -> torch.Tensor:
        flat = torch.cat([tensors[k].detach().float().reshape(-1).cpu() for k in self.keys]).double()
        if self.exact:
            return flat
        return torch.zeros(self.dim, dtype=torch.float64).index_add_(0, self.bucket, flat * self.sign.double())


def cosine_contributions(sketches: dict[int, torch.Tensor], weights: dict[int, float]) -> dict[int, float]:
    """cos(u_i, ū) with ū the example-weighted mean update of the round."""
    total = sum(weights.values())
    mean = sum(weights[c] * sketches[c] for c in sketches) / total
    return {c: float(F.cosine_similarity(sketches[c], mean, dim=0)) for c in sorted(sketches)}


@dataclass
class Acc:
    ws: Any
    reference: Optional[torch.Tensor] = None  # sketch of what clients were sent
    sketches: dict[int, torch.Tensor] = field(default_factory=dict)
    weights: dict[int, float] = field(default_factory=dict)


# --- the algorithm ---------------------------------------------------------------------

@dataclass
class Resident:
    model: Any  # PeftModel with one adapter
    data: FederatedData
    device: torch.device
    trainer: Any = None  # TorchTrainer or DeepSpeedTrainer, built on first use
    group: Any = None  # world_size > 1: the RankGroup that trains this worker's clients
    text_features: dict[int, torch.Tensor] = field(default_factory=dict)  # client -> locked tower's features


class FedLarge(FromConfig):
    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.opts: Options = options_of(cfg)
        self.name = vlm_lora.adapter_name(cfg.lora.r)

    def config_problems(self) -> list[str]:
        c = self.cfg
        if self.opts.contribution != "none" and (c.privacy.dp or c.privacy.secure_aggregation or c.robust.rule != "mean"
                                                  or c.robust.max_norm_ratio is not None):
            return [
                f"algorithm.options.contribution: '{self.opts.contribution}' (algorithm 'fedlarge') sketches every client's update,"
                " which the driver does not see under privacy.dp, privacy.secure_aggregation or a robust.rule other than mean;"
                " set it to 'none' or drop those options"
            ]
        return []

    def lora_aggregation(self) -> str:
        return self.cfg.algorithm.lora_aggregation  # read by vlm_lora's adapter fold

    # --- shared by driver and workers ---------------------------------------------
    @cached_property
    def tokenizer(self):
        if self.opts.base == "minilm":
            return load_minilm_tokenizer()
        if self.cfg.model.kind == "pretrained":
            return load_vlm_tokenizer(self.cfg.model.path)
        return None  # raysim's tiny CLIP: the word tokenizer

    @cached_property
    def data(self) -> FederatedData:
        return build_data(self.cfg, self.opts, self.tokenizer)

    @cached_property
    def base_dir(self) -> Path:
        if self.opts.base == "minilm":
            return minilm_base_dir(self.cfg, self.opts, self.data)
        return pretrained_base_dir(self.cfg, self.data)

    def build_resident(self, device: str | None = None) -> Resident:
        base = load_vlm(self.base_dir)
        for p in base.parameters():
            p.requires_grad_(False)
        if self.opts.gradient_checkpointing:
            enable_gradient_checkpointing(base)
        lc = self.cfg.lora
        torch.manual_seed(self.cfg.seed)  # peft draws lora_A at random: make it the seed's
        model = add_lora(base, {self.name: lora_config(lc.r, lc.alpha, lc.dropout, lc.target_modules, lc.modules_to_save)})
        if self.opts.lock_text_tower and self.opts.base == "minilm":
            mark_locked_text_tower(base)
        model.eval()
        device = vlm_lora.resolve_device(device or self.cfg.runtime.device)
        return Resident(model.to(device), self.data, device)

    @cached_property
    def _eval_resident(self) -> Resident:
        return self.build_resident()

    def sketch(self, tensors: Tensors) -> torch.Tensor:
        """Sketch of an adapter; the map is built from the first adapter seen (all share keys
        and shapes) and is the same in every process, being drawn from the seed."""
        if self.__dict__.get("_sketch") is None:
            self.__dict__["_sketch"] = CountSketch(tensors, self.opts.contribution_sketch_dim, self.cfg.seed)
        return self.__dict__["_sketch"](tensors)

    # --- driver side ---------------------------------------------------------------
    def init_server(self) -> Tensors:
        return adapter_state(self._eval_resident.model, self.name)

    def broadcast(self, state: Tensors, round: int, client_ids: list[int]) -> Broadcast:
        return Broadcast(round=round, tensors=state)

    def finalize(self, state: Tensors, acc: Acc) -> Tensors:
        return vlm_lora.adapter_fold_result(acc.ws, self.cfg)

    def round_metrics(self, acc: Acc) -> dict:
        """This round's per-client contribution scores, from the round's fold."""
        scores = cosine_contributions(acc.sketches, acc.weights) if acc.sketches else {}
        return {"contribution": {str(c): s for c, s in scores.items()}} if scores else {}

    def evaluate(self, state: Tensors) -> dict:
        r = self._eval_resident
        activate(r.model, self.name)
        load_adapter_state(r.model, self.name, state)
        return vlm_lora.evaluate_dual_encoder(r.model, r.data, self.cfg.eval.batch_size, r.device)

    def summary_extra(self, history: list[dict]) -> dict:
        """Contribution over the whole run: mean score per participation, and the ranking."""
        sums: dict[str, float] = {}
        counts: dict[str, int] = {}
        for rec in history:
            for c, s in rec.get("contribution", {}).items():
                sums[c] = sums.get(c, 0.0) + s
                counts[c] = counts.get(c, 0) + 1
        mean = {c: sums[c] / counts[c] for c in sorted(sums, key=int)}
        ranking = sorted(mean, key=lambda c: (-mean[c], int(c)))
        return {"contribution": {"mean": mean, "rounds": counts, "ranking": [int(c) for c in ranking]}} if mean else {}

    def save_final(self, state: Tensors, run_dir: Path) -> None:
        """run_dir/adapter loads with PeftModel.from_pretrained(load_vlm(run_dir/"base_model"),
        run_dir/"adapter"); run_dir/contribution.json holds the run's contribution scores."""
        save_adapter(self._eval_resident.model, self.name, state, run_dir / "adapter")
        shutil.copytree(self.base_dir, run_dir / "base_model", dirs_exist_ok=True)
        metrics = run_dir / "metrics.jsonl"
        history = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
        (run_dir / "contribution.json").write_text(json.dumps(self.summary_extra(history).get("contribution", {}), indent=1))

    # --- worker side ---------------------------------------------------------------
    def _trainer(self, res: Resident, local: bool = False):
        """The backend that trains here; `local`: a torch one for the coordinator of a rank
        group, which only scores data quality with the global model."""
        if res.trainer is None:
            t, o = self.cfg.train, self.opts
            if o.backend == "deepspeed" and not local:
                micro = -(-t.batch_size // o.world_size)  # rows per rank (DeepSpeed's bookkeeping only)
                res.trainer = DeepSpeedTrainer(res.model, self.name, o, res.device, t.lr, t.weight_decay, micro)
            else:
                res.trainer = TorchTrainer(res.model, self.name, o, res.device)
        return res.trainer

    def _group(self, res: Resident):
        """The Ray actors that train this worker's clients together, started on first use
        and kept for every client the worker serves (they go when the resident goes; a
        group closed by a failed rank is replaced)."""
        if res.group is None or res.group.closed:
            from actors.rank_group import RankGroup

            o = self.opts
            env = {k: os.environ[k] for k in ("TORCH_EXTENSIONS_DIR", "RAYSIM_CACHE") if k in os.environ}
            res.group = RankGroup(functools.partial(GroupRank, self), o.world_size, o.rank_num_cpus, o.rank_num_gpus,
                                  self.cfg.runtime.torch_threads, env)
        return res.group

    def client_reference(self, msg: Broadcast, client_id: int) -> Tensors:
        """What this client was sent: its update is its result minus this."""
        return msg.tensors

    def _weights(self, ctx: ClientContext, trainer, data: PairData, features: torch.Tensor | None) -> torch.Tensor:
        """Quality weights of the client's pairs, re-scored by the current global model
        (already loaded) when the client has no scores or they are `quality_every` old."""
        o = self.opts
        if o.quality == "none":
            return torch.ones(len(data))
        q = ctx.state.get("quality")
        stale = q is None or (o.quality_every and ctx.round - int(q["round"]) >= o.quality_every)
        if stale:
            trainer.train(False)
            scores = pair_scores(trainer.forward, data, self.cfg.eval.batch_size, ctx.resident.device, o.precision,
                                 features)
            q = ctx.state["quality"] = {"scores": scores, "round": torch.tensor(ctx.round)}
        return quality_weights(q["scores"], o)

    def client_step(self, ctx: ClientContext, msg: Broadcast) -> ClientResult:
        res, t, o = ctx.resident, self.cfg.train, self.opts
        grouped = o.world_size > 1
        trainer = self._trainer(res, local=grouped)
        moments = ctx.state.get("optimizer") if t.keep_optimizer_state else None
        trainer.start(msg.tensors, t.lr, t.weight_decay, None if grouped else moments)
        data = res.data.client(ctx.client_id)
        n_local = len(data)
        features = None  # the locked text tower's features of the client's captions
        if not grouped and isinstance(trainer, TorchTrainer) and locked_text_tower(res.model) is not None:
            if ctx.client_id not in res.text_features:  # the client's captions never change in a run
                res.text_features[ctx.client_id] = locked_text_features(res.model, data, self.cfg.eval.batch_size,
                                                                        res.device)
            features = res.text_features[ctx.client_id]
        weights = self._weights(ctx, trainer, data, features)
        rows = torch.nonzero(weights > 0).flatten()  # filtered pairs are not even loaded
        data, weights = data.subset(rows), weights[rows]
        if grouped:
            results = self._group(res).call("train_client", msg.tensors, ctx.client_id, rows, weights, ctx.seed, moments)
            tensors, _, losses = results[0]
            moments = {f"rank{r}.{k}": v for r, (_, m, _) in enumerate(results) for k, v in m.items()}
        else:
            losses = train_batches(trainer, data, weights, ctx.seed, t, res.device, o.precision,
                                   text_features=None if features is None else features[rows])
            tensors, moments = trainer.finish()
        if t.keep_optimizer_state:
            ctx.state["optimizer"] = moments
        ctx.state["adapter"] = tensors
        metrics = {
            "train_loss": sum(losses) / len(losses) if losses else float("nan"),
            "kept_fraction": len(rows) / n_local,
        }
        return ClientResult(ctx.client_id, len(data), tensors, metrics)

    # --- the fold ------------------------------------------------------------------
    def zero(self, msg: Broadcast) -> Acc:
        ref = self.sketch(msg.tensors) if self.opts.contribution == "gradient" else None
        return Acc(agg.ws_zero(), ref)

    def accumulate(self, acc: Acc, result: ClientResult) -> Acc:
        acc.ws = vlm_lora.adapter_fold_add(acc.ws, result.tensors, float(result.num_examples), self.cfg)
        if acc.reference is not None:
            acc.sketches[result.client_id] = self.sketch(result.tensors) - acc.reference
            acc.weights[result.client_id] = float(result.num_examples)
        return acc

    def merge(self, a: Acc, b: Acc) -> Acc:
        ref = a.reference if a.reference is not None else b.reference
        return Acc(agg.ws_merge(a.ws, b.ws), ref, {**a.sketches, **b.sketches}, {**a.weights, **b.weights})


ALGORITHM = FedLarge
