"""FedLarge (raysim/algorithms/fedlarge.py: settings of the one LoRA path, raysim/lora/) and
models/minilm.py: the offline MiniLM tower, loading any VLM checkpoint directory, DeepSpeed
ZeRO 0-3 against plain torch, quality scores and contribution scores."""
import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import tiny_overrides
from models import minilm
from models.locked import locked_text_tower
from models.lora import activate
from raysim.algorithms import fedlarge
from raysim.config import ConfigError, LoraBackendConfig, QualityConfig, load_config
from raysim.lora import backends, contribution, distributed, objective, quality
from raysim.lora.adapters import adapter_name
from raysim.lora.train import train_batches
from raysim.run.engine import Engine

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "fedlarge.yaml")


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_cfg(**extra):
    """The tiny CLIP base of the rest of the suite (cached), through fedlarge."""
    base = {
        "algorithm.options.base": "config",
        "algorithm.options.caption_noise.clients": "[]",
        "algorithm.options.quality": "none",
        "lora.target_modules": "[q_proj,v_proj]",
        "model.max_text_len": 16,
        "train.keep_optimizer_state": "false",
        "clients.total": 6,
        "clients.per_round": 3,
    }
    base.update(extra)
    return load_config(CONFIG, tiny_overrides(**base))


def run(cfg, out) -> Engine:
    engine = Engine(cfg, str(out), resume=False)
    engine.start()
    while not engine.done():
        engine.run_round()
    engine.finish()
    return engine


# --- models ------------------------------------------------------------------------

def test_minilm_tower_is_the_pretrained_sentence_embedder():
    emb = minilm.minilm_sentence_embeddings(
        ["a photo of the digit seven", "an image of the number seven", "the stock market fell sharply today"]
    )
    sim = emb @ emb.T
    assert emb.shape == (3, 384)
    assert sim[0, 1] > 0.7  # paraphrases
    assert sim[0, 2] < 0.2 and sim[1, 2] < 0.2  # unrelated


@pytest.mark.parametrize("tower", ["vit", "resnet"])
def test_minilm_dual_encoder_round_trips_through_the_loader(tmp_path, tower):
    vision = minilm.image_tower_config(tower, image_size=16, patch_size=8, hidden_size=16, num_layers=1,
                                       num_heads=2, intermediate_size=32)
    model = minilm.build_minilm_dual_encoder(vision, projection_dim=8, seed=0)
    tok = minilm.load_minilm_tokenizer()
    minilm.save_with_tokenizer(model, tmp_path, tok)
    loaded = minilm.load_vlm(tmp_path)
    batch = minilm.load_vlm_tokenizer(tmp_path)(["a handwritten two", "a small picture of a nine"], padding=True,
                                                 return_tensors="pt")
    x = torch.randn(2, 3, 16, 16)
    a = model(pixel_values=x, **batch)
    b = loaded(pixel_values=x, **batch)
    assert type(loaded) is minilm.MeanPoolDualEncoder
    torch.testing.assert_close(a.logits_per_image, b.logits_per_image)
    # mean pooling, not BERT's [CLS] pooler: the text embedding is the projected masked mean
    hidden = loaded.text_model(**batch).last_hidden_state
    expect = loaded.text_projection(minilm.mean_pool(hidden, batch["attention_mask"]))
    torch.testing.assert_close(loaded.get_text_features(**batch).pooler_output, expect)


def _minilm_algo(tmp_path, **extra):
    """FedLarge on a MiniLM dual encoder with a tiny untrained image tower, saved to tmp_path
    (no central alignment: these tests compare training paths, not accuracy)."""
    over = {"algorithm.options.base": "minilm", "algorithm.options.quality": "none",
            "algorithm.options.caption_noise.clients": "[]", "clients.total": 6, "train.local_epochs": 2}
    algo = fedlarge.FedLarge(load_config(CONFIG, tiny_overrides(**{**over, **extra})))
    base = tmp_path / "base"
    if not base.is_dir():
        vision = minilm.image_tower_config("vit", image_size=algo.cfg.data.image_size, patch_size=8, hidden_size=16,
                                           num_layers=1, num_heads=2, intermediate_size=32)
        minilm.save_with_tokenizer(minilm.build_minilm_dual_encoder(vision, projection_dim=8, seed=0), base,
                                   minilm.load_minilm_tokenizer())
    algo.__dict__["base_dir"] = base
    return algo


def _client_step(algo, res, cid=1, rnd=1):
    """One client step from the initial adapter; its adapter and the client's state after it."""
    from actors.protocol import Broadcast, ClientContext

    ctx = ClientContext(cid, rnd, 1234 + cid, None, res, {})
    return algo.client_step(ctx, Broadcast(round=rnd, tensors=algo.init_server())).tensors, ctx.state


def test_locked_text_tower_features_are_computed_once_and_change_nothing_else(tmp_path):
    """The locked tower's cached features give the adapter of running the (locked, inference
    mode) tower inside every forward pass; without the lock the tower's dropout is on."""
    algo = _minilm_algo(tmp_path)
    res = algo.build_resident()
    assert locked_text_tower(res.model) is not None
    cached, _ = _client_step(algo, res)
    features = res.text_features[1]
    assert features.shape == (len(res.data.client(1)), 384)
    _client_step(algo, res, rnd=2)
    assert res.text_features[1] is features  # reused, not recomputed

    # The same training, the tower run in every forward pass (what DeepSpeed does).
    ref = algo.build_resident()
    trainer = backends.TorchTrainer(ref.model, algo.lora.precision, ref.device)
    t = algo.cfg.train
    trainer.start(adapter_name(algo.lora.r), algo.init_server(), t.lr, t.weight_decay, None)
    data = ref.data.client(1)
    train_batches(trainer, data, torch.ones(len(data)), 1234 + 1, t, algo.lora, ref.device)
    assert not ref.text_features
    for k, v in trainer.finish()[0].items():
        torch.testing.assert_close(cached[k], v, atol=1e-5, rtol=1e-4, msg=k)

    # Quality scores from the cached features are the scores of running the tower.
    trainer.train(False)
    torch.testing.assert_close(
        quality.pair_scores(trainer.forward, data, 256, ref.device, text_features=features),
        quality.pair_scores(trainer.forward, data, 256, ref.device), atol=1e-6, rtol=1e-5)

    trainer.train(True)  # a locked tower stays in inference mode while the rest trains
    text_model = ref.model.get_base_model().text_model
    assert not text_model.training and ref.model.get_base_model().vision_model.training

    unlocked = _minilm_algo(tmp_path, **{"algorithm.options.lock_text_tower": "false"})
    res_u = unlocked.build_resident()
    assert locked_text_tower(res_u.model) is None
    dropped, _ = _client_step(unlocked, res_u)
    assert not res_u.text_features
    assert max((dropped[k] - cached[k]).abs().max().item() for k in cached) > 1e-4  # dropout in the tower


def test_quality_weighting_scores_a_locked_tower_from_its_cached_features(tmp_path):
    algo = _minilm_algo(tmp_path, **{"algorithm.options.quality": "weight", "algorithm.options.filter_threshold": 0,
                                     "algorithm.options.quality_every": 1})
    res = algo.build_resident()
    _, state = _client_step(algo, res)
    assert 1 in res.text_features  # computed before scoring, reused for training
    ref = algo.build_resident()
    activate(ref.model, adapter_name(algo.lora.r))
    ref.model.eval()
    expect = quality.pair_scores(ref.model, ref.data.client(1), algo.cfg.eval.batch_size, ref.device)
    torch.testing.assert_close(state["quality"]["scores"], expect, atol=1e-6, rtol=1e-5)


def test_lora_in_the_text_tower_unlocks_it(tmp_path):
    algo = _minilm_algo(tmp_path, **{"lora.target_modules": "[q_proj,v_proj,query,value]"})
    res = algo.build_resident()
    assert locked_text_tower(res.model) is None
    _client_step(algo, res)
    assert not res.text_features


def _tiny_checkpoints():
    from transformers import (CLIPConfig, CLIPModel, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, SiglipConfig, SiglipModel, BertConfig, ViTConfig,
                              VisionTextDualEncoderConfig, VisionTextDualEncoderModel)

    common = dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32)
    vision = dict(common, image_size=16, patch_size=8)
    text = dict(common, vocab_size=64, max_position_embeddings=16)
    ids = dict(pad_token_id=0, bos_token_id=1, eos_token_id=3)
    yield "clip", CLIPModel(CLIPConfig(text_config=dict(text, **ids), vision_config=vision, projection_dim=8))
    yield "siglip", SiglipModel(SiglipConfig(text_config=text, vision_config=vision))
    yield "vtde", VisionTextDualEncoderModel(VisionTextDualEncoderConfig.from_vision_text_configs(
        ViTConfig(**vision), BertConfig(**text), projection_dim=8))
    llava = LlavaConfig(vision_config=CLIPVisionConfig(**vision), text_config=LlamaConfig(**text, **ids, head_dim=8),
                        image_token_index=63, vision_feature_layer=-1)
    yield "llava", LlavaForConditionalGeneration(llava)


def test_loader_takes_tiny_hf_checkpoints(tmp_path):
    x = torch.randn(1, 3, 16, 16)
    ids = torch.tensor([[1, 5, 6, 7]])
    for name, model in _tiny_checkpoints():
        model.eval()
        model.save_pretrained(tmp_path / name)
        loaded = minilm.load_vlm(tmp_path / name)
        assert type(loaded) is type(model), name
        for (k, v), (k2, v2) in zip(model.state_dict().items(), loaded.state_dict().items()):
            assert k == k2 and torch.equal(v, v2), (name, k)
        with torch.no_grad():
            if name == "llava":  # generative: image features and next-token logits
                feats = loaded.get_image_features(pixel_values=x).pooler_output  # one tensor per image
                assert feats[0].shape[-1] == 16  # projected into the language model's width
                assert loaded(input_ids=ids).logits.shape == (1, 4, 64)
            else:
                from models.clip import encode_images, encode_texts

                sim = encode_images(loaded, x) @ encode_texts(loaded, ids, torch.ones_like(ids)).T
                assert sim.shape == (1, 1) and -1 <= sim.item() <= 1


# --- DeepSpeed -------------------------------------------------------------------------

@pytest.fixture
def extensions_dir(tmp_path, monkeypatch):
    """A per-test TORCH_EXTENSIONS_DIR (a stale lock in ~/.cache/torch_extensions once hung
    CI), seeded with the DeepSpeed shm op already built there (mtimes kept, lock files
    not copied) so ninja finds it up to date instead of compiling it again. The rank
    actors get the variable from FedLarge._group (RankGroup env)."""
    import shutil
    import sys

    from torch.utils.cpp_extension import get_default_build_root

    # Without the variable torch builds in <root>/py311_cpu/<op>; with it, in $DIR/<op>.
    accel = "cpu" if torch.version.cuda is None else "cu" + torch.version.cuda.replace(".", "")
    built = Path(get_default_build_root()) / f"py{sys.version_info.major}{sys.version_info.minor}{sys.abiflags}_{accel}"
    target = tmp_path / "torch_extensions"
    if built.is_dir():
        shutil.copytree(built, target, ignore=shutil.ignore_patterns("lock"))
    target.mkdir(exist_ok=True)
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(target))
    return target


def test_deepspeed_zero2_gives_the_torch_adapter(tmp_path, extensions_dir):
    """ZeRO-2 over 2 rounds. (ZeRO-3 against the torch backend, also 2 rounds:
    test_deepspeed_keeps_each_clients_optimizer_state_across_rounds.)"""
    pytest.importorskip("deepspeed")
    states = {}
    for name, extra in [("torch", {}), ("zero2", {"algorithm.options.backend": "deepspeed"})]:
        engine = run(tiny_cfg(**extra), tmp_path / name)
        states[name] = engine.state
    start = fedlarge.FedLarge(tiny_cfg()).init_server()
    moved = max((states["torch"][k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-3  # two rounds really trained
    for k, v in states["torch"].items():
        torch.testing.assert_close(states["zero2"][k], v, atol=1e-3, rtol=1e-3, msg=k)


def test_deepspeed_keeps_each_clients_optimizer_state_across_rounds(tmp_path, extensions_dir):
    """Every client trains in both rounds; with train.keep_optimizer_state ZeRO-3 carries
    each client's (flat, partitioned) AdamW moments into its next training and gives the
    torch backend's adapter, which differs from fresh moments. (ZeRO-2 keeps them the
    same way: test_deepspeed_zero2_over_two_ranks_gives_the_torch_adapter.)"""
    pytest.importorskip("deepspeed")
    every = {"clients.total": 3, "clients.per_round": 3}
    keep = {**every, "train.keep_optimizer_state": "true"}
    states = {}
    for name, extra in [("fresh", every), ("torch", keep),
                        ("zero3", {**keep, "algorithm.options.backend": "deepspeed", "algorithm.options.zero_stage": 3})]:
        engine = run(tiny_cfg(**extra), tmp_path / name)
        states[name] = engine.state
        if name == "zero3":
            kept = engine.pool.worker.store.get(0, 2)["optimizer"]
            adapter = sum(v.numel() for v in engine.state.values())
            assert kept["optim.0.step"].item() > 1  # steps of both rounds
            assert kept["optim.0.exp_avg"].numel() >= adapter  # one flat partition (world of one rank)
    effect = max((states["torch"][k] - v).abs().max().item() for k, v in states["fresh"].items())
    assert effect > 1e-2  # kept moments change the result by far more than the tolerance below
    for k, v in states["torch"].items():
        torch.testing.assert_close(states["zero3"][k], v, atol=1e-3, rtol=1e-3, msg=k)


def test_deepspeed_config_and_options():
    backend = LoraBackendConfig(name="deepspeed", zero_stage=3, offload="optimizer_and_params")
    conf = backends.deepspeed_config(backend, 16)
    assert conf["zero_optimization"] == {"stage": 3, "offload_optimizer": {"device": "cpu"},
                                         "offload_param": {"device": "cpu"}}
    assert conf["gradient_clipping"] == 0.0 and conf["zero_allow_untested_optimizer"]
    assert conf["zero_force_ds_cpu_optimizer"] is False  # torch AdamW even with offload
    with pytest.raises(ValueError, match="zero_stage 3"):
        LoraBackendConfig(name="deepspeed", zero_stage=2, offload="optimizer_and_params")
    with pytest.raises(ValueError, match="world_size > 1"):
        fedlarge.Options(backend="torch", world_size=2)
    # fedlarge's options are mapped onto the lora: settings and checked there, naming them
    options = {"algorithm.options.backend": "deepspeed", "algorithm.options.offload": "optimizer_and_params"}
    with pytest.raises(ConfigError, match="(?s)algorithm.options.*zero_stage 3"):
        fedlarge.FedLarge(tiny_cfg(**options))
    mapped = fedlarge.FedLarge(tiny_cfg(**options, **{"algorithm.options.zero_stage": 3})).lora.backend
    assert (mapped.name, mapped.zero_stage, mapped.offload) == ("deepspeed", 3, "optimizer_and_params")


# --- a client over several ranks ---------------------------------------------------------

def test_shard_rows_split_a_batch_into_padded_contiguous_chunks():
    b = torch.tensor([10, 11, 12, 13, 14])
    assert distributed.shard_rows(b, 0, 2).tolist() == [10, 11, 12]
    assert distributed.shard_rows(b, 1, 2).tolist() == [13, 14, 14]  # padded with the last row
    two = torch.tensor([5, 9])
    assert [distributed.shard_rows(two, r, 4).tolist() for r in range(4)] == [[5], [9], [9], [9]]
    # gathered in rank order, the first n rows are the batch itself
    for n, world in [(5, 2), (7, 3), (16, 2), (2, 4)]:
        b = torch.arange(100, 100 + n)
        assert torch.cat([distributed.shard_rows(b, r, world) for r in range(world)])[:n].tolist() == b.tolist()


def test_group_loss_gradient_is_the_one_process_gradient(ray_cluster):
    """Two gloo ranks in Ray actors each forward their shard of a batch of 7 (one padding
    row), compute the CLIP loss of the whole batch from the gathered embeddings and
    average their parameter gradients as DeepSpeed does: the gradient of one process on
    the whole batch. Plain gradients, not Adam steps: Adam would hide a wrong scale."""
    from actors.rank_group import RankGroup

    def _toy_embeddings(w_img, w_txt, x, y, scale):  # local: shipped to the actors by value
        from types import SimpleNamespace

        img = torch.nn.functional.normalize(x @ w_img, dim=-1)
        txt = torch.nn.functional.normalize(y @ w_txt, dim=-1)
        return SimpleNamespace(image_embeds=img, text_embeds=txt, logits_per_image=(txt @ img.T * scale).T)

    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 5, generator=gen), torch.randn(7, 6, generator=gen)
    w_img, w_txt = torch.randn(5, 4, generator=gen), torch.randn(6, 4, generator=gen)
    weights = torch.tensor([1.0, 0.5, 1.0, 0.2, 1.0, 1.0, 0.7])
    scale = torch.tensor([14.3])

    class Rank:  # defined here: cloudpickle ships it to the actors by value
        def __init__(self, rank, world):
            self.rank, self.world = rank, world

        def grads(self, x, y, w_img, w_txt, weights, scale):
            import torch.distributed as dist

            params = [w_img.clone().requires_grad_(), w_txt.clone().requires_grad_()]
            rows = distributed.shard_rows(torch.arange(len(x)), self.rank, self.world)
            out = _toy_embeddings(*params, x[rows], y[rows], scale)
            logits = distributed.group_logits(out, len(x), (scale, None), check=True)
            objective.weighted_clip_loss(logits, weights).backward()
            grads = [p.grad for p in params]
            for g in grads:  # the data-parallel average DeepSpeed applies
                dist.all_reduce(g)
                g /= self.world
            return grads

        def fail(self):
            import torch.distributed as dist

            if self.rank == 1:
                raise ValueError("rank 1 fails")
            dist.all_reduce(torch.ones(1))  # waits for rank 1, which never comes

    free = ray_cluster.available_resources().get("CPU", 0)
    group = RankGroup(Rank, 2, num_cpus=0.5)
    try:
        per_rank = group.call("grads", x, y, w_img, w_txt, weights, scale)
        # A failing rank: the error comes back at once and the group is torn down (rank 0
        # would otherwise wait in its all_reduce for gloo's 30-minute timeout).
        t0 = time.time()
        with pytest.raises(ValueError, match="rank 1 fails"):
            group.call("fail")
        assert group.closed and time.time() - t0 < 60
    finally:
        group.close()
    deadline = time.time() + 10
    while ray_cluster.available_resources().get("CPU", 0) < free and time.time() < deadline:
        time.sleep(0.2)
    assert ray_cluster.available_resources().get("CPU", 0) == pytest.approx(free)
    params = [w_img.clone().requires_grad_(), w_txt.clone().requires_grad_()]
    out = _toy_embeddings(*params, x, y, scale)
    objective.weighted_clip_loss(out.logits_per_image, weights).backward()
    assert params[0].grad.abs().max() > 0.01
    for grads in per_rank:  # both ranks hold the same averaged gradient
        for g, p in zip(grads, params):
            torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-5)


def test_deepspeed_zero2_over_two_ranks_gives_the_torch_adapter(ray_cluster, extensions_dir, tmp_path):
    """One client's local training in two Ray actors (one placement group, gloo, ZeRO-2
    with a torch AdamW): two rounds, every client in both, each keeping its optimizer
    state (each rank's partition), give the one-process torch backend's adapter."""
    pytest.importorskip("deepspeed")
    import gc

    free = ray_cluster.available_resources().get("CPU", 0)
    keep = {"clients.total": 3, "clients.per_round": 3, "train.keep_optimizer_state": "true"}
    torch_state = run(tiny_cfg(**keep), tmp_path / "torch").state
    group = {"algorithm.options.backend": "deepspeed", "algorithm.options.world_size": 2,
             "algorithm.options.rank_num_cpus": 0.5}
    engine = run(tiny_cfg(**keep, **group), tmp_path / "zero2x2")
    worker = engine.pool.worker
    ranks = worker.group
    assert len(set(ranks.pids)) == 2 and os.getpid() not in ranks.pids  # two processes of their own
    assert ray_cluster.available_resources().get("CPU", 0) == pytest.approx(free - 1.0)
    kept = worker.store.get(0, 2)["optimizer"]
    adapter = sum(v.numel() for v in torch_state.values())
    halves = [kept[f"rank{r}.optim.0.exp_avg"].numel() for r in (0, 1)]
    assert halves[0] == halves[1] and adapter <= sum(halves) < adapter + 64  # ZeRO-2: half the moments each
    start = fedlarge.FedLarge(tiny_cfg()).init_server()
    moved = max((torch_state[k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-3
    diff = {k: (engine.state[k] - v).abs().max().item() for k, v in torch_state.items()}
    # Same batches, same loss, same gradient up to the order of float sums (the test above);
    # AdamW divides by sqrt(v), which magnifies that noise where a gradient is near zero,
    # but by less than a third of one step (lr 3e-3): a lost, repeated or wrong step fails.
    assert max(diff.values()) < 1e-3, diff
    # Closing the worker frees the rank actors and their placement group.
    del ranks, engine
    worker.close()
    gc.collect()
    deadline = time.time() + 10
    while ray_cluster.available_resources().get("CPU", 0) < free and time.time() < deadline:
        time.sleep(0.2)
    assert ray_cluster.available_resources().get("CPU", 0) == pytest.approx(free)


# --- data quality ----------------------------------------------------------------------

def test_quality_scores_find_shuffled_captions():
    cfg = tiny_cfg(**{"algorithm.options.caption_noise.clients": "[0,1,2]", "algorithm.options.quality": "filter",
                      "pretrain.epochs": 20})
    algo = fedlarge.FedLarge(cfg)
    res = algo.build_resident()
    bad, good, dropped_bad, dropped = [], [], 0, 0
    for c in (0, 1, 2):
        rows = algo.data.client_partition[c]
        scores = quality.pair_scores(res.model, algo.data.client(c), 256, res.device)
        wrong = torch.from_numpy(algo.data.mismatched[rows])
        drop = quality.quality_weights(scores, algo.lora.quality) == 0
        bad += scores[wrong].tolist()
        good += scores[~wrong].tolist()
        dropped += int(drop.sum())
        dropped_bad += int((drop & wrong).sum())
    assert len(bad) >= 10  # about 30% of the three clients' pairs
    assert np.mean(bad) < np.mean(good) - 0.05
    # 30% dropped: mostly mismatched pairs, about twice their share of the data
    assert dropped_bad / dropped > 0.5
    assert dropped_bad / dropped > 1.8 * len(bad) / (len(bad) + len(good))
    # weighting keeps every pair but trusts low scorers less
    w = quality.quality_weights(scores, QualityConfig(mode="weight"))
    assert (w > 0).all() and w[scores.argmin()] < w[scores.argmax()]


def test_quality_weights_by_hand():
    scores = torch.tensor([0.1, 0.2, -0.05, 0.3, 0.4])
    # threshold 0: only the pair scoring below an average other caption goes
    keep = quality.quality_weights(scores, QualityConfig(mode="filter", filter_threshold=0.0))
    assert keep.tolist() == [1, 1, 0, 1, 1]
    # lowest 30%: the 0.3 quantile of [-0.05, 0.1, 0.2, 0.3, 0.4] is 0.1 + 0.2 * 0.1 = 0.12,
    # so a clean pair (0.1) goes too
    keep = quality.quality_weights(scores, QualityConfig(mode="filter", filter_fraction=0.3))
    assert keep.tolist() == [0, 1, 0, 1, 1]
    # all below the threshold: the two best stay (a contrastive batch needs two pairs)
    at_zero = QualityConfig(mode="filter", filter_threshold=0.0)
    assert quality.quality_weights(torch.tensor([-0.1, -0.3, -0.2]), at_zero).tolist() == [1, 0, 1]
    # weight: sigmoid(score / 0.05) around threshold 0: 0.1 -> sigmoid(2), -0.05 -> sigmoid(-1)
    w = quality.quality_weights(scores, QualityConfig(mode="weight", filter_threshold=0.0))
    torch.testing.assert_close(w[[0, 2]], torch.tensor([0.880797, 0.268941]))


def test_caption_noise_only_touches_the_listed_clients():
    algo = fedlarge.FedLarge(tiny_cfg(**{"algorithm.options.caption_noise.clients": "[1]"}))
    clean = fedlarge.FedLarge(tiny_cfg())
    for c in range(6):
        same = torch.equal(algo.data.client(c).input_ids, clean.data.client(c).input_ids)
        assert same == (c != 1)
    assert torch.equal(algo.data.test.input_ids, clean.data.test.input_ids)


# --- contribution -------------------------------------------------------------------------

def test_corrupted_client_gets_the_lowest_contribution(tmp_path):
    cfg = tiny_cfg(**{"algorithm.options.caption_noise.clients": "[2]", "algorithm.options.caption_noise.fraction": 1.0,
                      "clients.total": 4, "clients.per_round": 4, "rounds": 2, "pretrain.epochs": 20,
                      "data.partition": "iid", "train.local_epochs": 2})
    run(cfg, tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for rec in records[1:]:
        scores = rec["contribution"]
        assert set(scores) == {"0", "1", "2", "3"}
        assert min(scores, key=scores.get) == "2", scores
    summary = json.loads((tmp_path / "contribution.json").read_text())
    assert summary["ranking"][-1] == 2 and summary["rounds"]["2"] == 2


def test_count_sketch_keeps_cosines():
    gen = torch.Generator().manual_seed(0)
    a = {"x": torch.randn(3000, generator=gen), "y": torch.randn(40, 50, generator=gen)}
    b = {k: v + 0.7 * torch.randn(v.shape, generator=gen) for k, v in a.items()}
    flat = lambda t: torch.cat([t[k].reshape(-1) for k in sorted(t)])  # noqa: E731
    exact = torch.nn.functional.cosine_similarity(flat(a), flat(b), dim=0).item()
    sketch = contribution.CountSketch(a, 1024, seed=0)
    approx = torch.nn.functional.cosine_similarity(sketch(a), sketch(b), dim=0).item()
    assert abs(approx - exact) < 0.05
    assert contribution.CountSketch(a, 10**6, seed=0).exact
    # linear: the sketch of an update is the difference of sketches
    torch.testing.assert_close(sketch({k: b[k] - a[k] for k in a}), sketch(b) - sketch(a))
