"""The one LoRA path (raysim/lora/) as fedavg and fedprox users reach it through the typed
`lora:` section: DeepSpeed ZeRO 0-3 against torch, FedProx's term under DeepSpeed, the
locked MiniLM tower, contribution scores in each LoRA rule's space, and fedlarge being
nothing but settings of the same path."""
import pytest
import torch

from actors.protocol import Broadcast, ClientContext, ClientResult
from conftest import tiny_overrides
from models import minilm
from models.locked import locked_text_tower
from raysim import algorithms
from raysim.aggregate.lora import dense_products
from raysim.algorithms.fedavg import FedAvg
from raysim.algorithms.fedlarge import FedLarge
from raysim.cli import main
from raysim.config import load_config
from raysim.run.engine import Engine

QUICK = "configs/quickstart.yaml"
FEDLARGE = "configs/fedlarge.yaml"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def cfg(**extra):
    every = {"clients.total": 3, "clients.per_round": 3, "train.keep_optimizer_state": "true"}
    return load_config(QUICK, tiny_overrides(**{**every, **extra}))


def final_state(config, out):
    engine = Engine(config, str(out), resume=False)
    engine.start()
    while not engine.done():
        engine.run_round()
    engine.finish()
    return engine


def max_diff(a, b) -> float:
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_deepspeed_stages_and_fedprox_give_the_torch_adapter(tmp_path):
    """Two rounds, every client in both, each keeping its AdamW moments: ZeRO-0 and ZeRO-1
    give fedavg's torch adapter, ZeRO-2 fedprox's (its proximal term under DeepSpeed). The
    same loss on both sides (lora.loss model_logits); the tolerance is the float noise of
    test_fedlarge's ZeRO-2/3 comparisons."""
    pytest.importorskip("deepspeed")
    logits = {"lora.loss": "model_logits"}
    prox = {"algorithm.name": "fedprox", "algorithm.mu": 1.0}
    runs = {
        "torch": logits, "prox": {**logits, **prox},
        "zero0": {**logits, "lora.backend.name": "deepspeed", "lora.backend.zero_stage": 0},
        "zero1": {**logits, "lora.backend.name": "deepspeed", "lora.backend.zero_stage": 1},
        "prox_zero2": {**logits, **prox, "lora.backend.name": "deepspeed", "lora.backend.zero_stage": 2},
    }
    engines = {name: final_state(cfg(**extra), tmp_path / name) for name, extra in runs.items()}
    states = {name: e.state for name, e in engines.items()}
    start = FedAvg(cfg(**logits)).init_server()
    assert max_diff(states["torch"], start) > 1e-3  # two rounds really trained
    assert max_diff(states["prox"], states["torch"]) > 1e-3  # mu = 1 pulls towards the start
    for name, ref in [("zero0", "torch"), ("zero1", "torch"), ("prox_zero2", "prox")]:
        for k, v in states[ref].items():
            torch.testing.assert_close(states[name][k], v, atol=1e-3, rtol=1e-3, msg=f"{name} {k}")
    # ZeRO-0 steps torch's AdamW on the model's tensors: its kept moments are per tensor;
    # ZeRO-1 partitions them: one flat fp32 partition per parameter group.
    per_tensor = engines["zero0"].pool.worker.store.get(0, 2)["optimizer"]
    flat = engines["zero1"].pool.worker.store.get(0, 2)["optimizer"]
    adapter = sum(v.numel() for v in start.values())
    assert len({k.split(".")[1] for k in per_tensor}) == len(start) and per_tensor["optim.0.step"].item() > 1
    assert flat["optim.0.exp_avg"].numel() >= adapter and flat["optim.0.step"].item() > 1


def test_fedprox_refuses_zero3(tmp_path, capsys):
    over = tiny_overrides(**{"algorithm.name": "fedprox", "lora.backend.name": "deepspeed", "lora.backend.zero_stage": 3})
    assert main(["run", QUICK, *over, "--out", str(tmp_path / "run"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "algorithm.mu" in err and "ZeRO-3" in err and "'fedprox'" in err and "Traceback" not in err


def _tiny_minilm_base(path, image_size):
    vision = minilm.image_tower_config("vit", image_size=image_size, patch_size=8, hidden_size=16, num_layers=1,
                                       num_heads=2, intermediate_size=32)
    minilm.save_with_tokenizer(minilm.build_minilm_dual_encoder(vision, projection_dim=8, seed=0), path,
                               minilm.load_minilm_tokenizer())
    return path


def test_fedlarge_is_fedavg_with_its_options_as_lora_settings(tmp_path):
    """FedAvg given the lora: settings that fedlarge's options map onto (MiniLM base, locked
    text tower, quality weighting, contribution) takes exactly fedlarge's client step and fold."""
    common = {"clients.total": 6, "train.local_epochs": 2, "model.max_text_len": 12, "lora.target_modules": "[q_proj,v_proj]"}
    large = FedLarge(load_config(FEDLARGE, tiny_overrides(**common, **{"algorithm.options.caption_noise.clients": "[1]"})))
    typed = {"algorithm.name": "fedavg", "algorithm.options": "{}", "lora.base": "minilm", "lora.lock_text_tower": "true",
             "lora.loss": "model_logits",
             "lora.quality.mode": "weight", "lora.quality.every": 1, "lora.quality.filter_threshold": 0,
             "lora.contribution.mode": "gradient", "faults.caption_noise.clients": "[1]"}
    avg = FedAvg(load_config(FEDLARGE, tiny_overrides(**common, **typed)))
    assert avg.lora == large.lora and avg.cfg.faults == large.cfg.faults
    base = _tiny_minilm_base(tmp_path / "base", avg.cfg.data.image_size)
    outs = {}
    for name, alg in (("fedavg", avg), ("fedlarge", large)):
        alg.__dict__["base_dir"] = base
        res = alg.build_resident()
        assert locked_text_tower(res.model) is not None
        msg = Broadcast(1, alg.init_server())
        acc = alg.zero(msg)
        for cid in (0, 1):
            ctx = ClientContext(cid, 1, 100 + cid, None, res, {})
            result = alg.client_step(ctx, msg)
            assert cid in res.text_features and "quality" in ctx.state  # features cached, pairs scored
            acc = alg.accumulate(acc, result)
        outs[name] = (alg.finalize(msg.tensors, acc), alg.round_metrics(acc), result.metrics)
    (adapter_a, scores_a, m_a), (adapter_b, scores_b, m_b) = outs["fedavg"], outs["fedlarge"]
    assert all(torch.equal(adapter_a[k], adapter_b[k]) for k in adapter_b)
    assert scores_a == scores_b and set(scores_a["contribution"]) == {"0", "1"} and m_a == m_b


@pytest.mark.parametrize("rule", ["product", "hetlora"])
def test_contribution_compares_updates_in_the_rules_space(rule):
    """product: the clients' dense updates scaling * (B A - B0 A0); hetlora: their factor
    updates zero-padded to the largest rank. Exact sketch (few numbers): the scores are the
    cosines computed by hand."""
    over = {"algorithm.lora_aggregation": rule, "lora.client_ranks": "[2,4]", "lora.contribution.mode": "gradient",
            "lora.modules_to_save": "[]"}
    alg = algorithms.load("fedavg")(load_config(QUICK, tiny_overrides(**over)))
    gen = torch.Generator().manual_seed(0)
    key = "m.q_proj.lora_{}.weight"
    glob = {key.format("A"): torch.randn(4, 6, generator=gen), key.format("B"): torch.randn(5, 4, generator=gen)}
    msg = Broadcast(1, glob)
    acc = alg.zero(msg)
    results = {}
    for cid, rank in ((0, 2), (1, 4), (2, 2)):
        sent = alg.client_reference(msg, cid)
        assert sent[key.format("A")].shape[0] == rank
        results[cid] = {k: v + 0.3 * torch.randn(v.shape, generator=gen) for k, v in sent.items()}
        acc = alg.accumulate(acc, ClientResult(cid, 10 * (cid + 1), results[cid]))
    scores = alg.round_metrics(acc)["contribution"]

    def space(t):
        if rule == "product":
            return dense_products(t, alg.lora.alpha / alg.lora.r)
        a, b = t[key.format("A")], t[key.format("B")]
        return {key.format("A"): torch.cat([a, a.new_zeros(4 - len(a), 6)]),
                key.format("B"): torch.cat([b, b.new_zeros(5, 4 - b.shape[1])], 1)}

    def flat(t):
        return torch.cat([t[k].double().float().double().reshape(-1) for k in sorted(t)])

    updates = {c: flat(space(r)) - flat(space(alg.client_reference(msg, c))) for c, r in results.items()}
    mean = sum(10 * (c + 1) * u for c, u in updates.items()) / 60
    for c, u in updates.items():
        assert scores[str(c)] == pytest.approx(float(torch.nn.functional.cosine_similarity(u, mean, dim=0)), abs=1e-9)
    assert len(set(scores.values())) == 3
