"""FST-CBDG: pure pieces by hand, the algorithm contract, and runs in local mode and
through real Ray actors."""
import json

import pytest
import torch

from actors.protocol import Broadcast, ClientContext, bytes_down
from raysim.algorithms import fst_cbdg
from raysim.algorithms import options_of
from raysim.config import load_config
from raysim.pretrain import pretrained_base_dir
from raysim.run.seeding import derive_seed
from tests.conftest import tiny_overrides

CONFIG = "configs/fst_cbdg.yaml"
C, D = 10, 32  # classes, tiny projection_dim


def tiny_cfg(**extra):
    return load_config(CONFIG, tiny_overrides(**extra))


# --- pure functions ------------------------------------------------------------------

def test_balanced_counts_fill_every_class_to_the_largest():
    # pseudo-classes: 0 x4, 2 x1, 3 x2 -> fill everyone up to 4
    hard = torch.tensor([0, 0, 0, 0, 2, 3, 3])
    assert fst_cbdg.balanced_counts(hard, 5).tolist() == [0, 4, 3, 2, 4]
    # an explicit target below a class's count gives that class nothing, never a negative
    assert fst_cbdg.balanced_counts(hard, 5, target=3).tolist() == [0, 3, 2, 1, 3]


def test_generated_features_are_unit_and_balanced():
    text = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    counts = fst_cbdg.balanced_counts(torch.tensor([1, 1, 1, 2]), 4)  # [3, 0, 2, 3]
    feats, labels = fst_cbdg.generate_features(text, counts, 0.0, torch.Generator().manual_seed(0))
    assert torch.bincount(labels, minlength=4).tolist() == [3, 0, 2, 3]
    assert torch.allclose(feats, text[labels])  # sigma 0: exactly the text features
    real_plus_synthetic = torch.bincount(torch.tensor([1, 1, 1, 2]), minlength=4) + torch.bincount(labels, minlength=4)
    assert real_plus_synthetic.tolist() == [3, 3, 3, 3]
    noisy, _ = fst_cbdg.generate_features(text, counts, 0.5, torch.Generator().manual_seed(0))
    assert torch.allclose(noisy.norm(dim=-1), torch.ones(8))
    assert not torch.allclose(noisy, feats)


def test_soft_label_moving_average():
    old = torch.tensor([[1.0, 0.0], [0.5, 0.5]])
    probs = torch.tensor([[0.0, 1.0], [0.9, 0.1]])
    new = fst_cbdg.update_soft_labels(old, probs, 0.9)
    assert torch.allclose(new, torch.tensor([[0.9, 0.1], [0.54, 0.46]]))
    assert torch.allclose(new.sum(-1), torch.ones(2))


def test_options_are_validated():
    from raysim.config import ConfigError

    with pytest.raises(ConfigError, match="algorithm.options.noise_sigm"):
        options_of(load_config(CONFIG, ["algorithm.options.noise_sigm=0.1"]))
    with pytest.raises(ConfigError, match="label_momentum"):
        options_of(load_config(CONFIG, ["algorithm.options.label_momentum=1.5"]))


def test_pretrain_cache_is_reused():
    cfg = tiny_cfg()
    first = pretrained_base_dir(cfg)
    logs = []
    again = pretrained_base_dir(cfg, log=logs.append)
    assert again == first and logs == []  # no second training for an unchanged config


def test_base_does_not_depend_on_the_callers_thread_count():
    # Unpinned, these two bases differ (float sums depend on the thread count); the cache is
    # keyed by the config alone, so train_base trains with one thread whatever the caller set.
    from raysim.data import FederatedData
    from raysim.pretrain import train_base

    cfg = tiny_cfg()
    data = FederatedData(cfg)
    before = torch.get_num_threads()
    states = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            states.append(train_base(cfg, data, log=lambda *a: None).state_dict())
            assert torch.get_num_threads() == threads  # the caller's setting comes back
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


# --- the contract ----------------------------------------------------------------------

def step(alg, resident, client_id, msg, state):
    ctx = ClientContext(client_id, msg.round, derive_seed(alg.cfg.seed, msg.round, client_id), None, resident, state)
    return alg.client_step(ctx, msg), ctx


def test_head_trains_travels_as_c_by_d_and_folds_by_samples():
    # determinism, pickling, untouched inputs and merge order: tests/test_algorithm_contract.py
    alg = fst_cbdg.ALGORITHM(tiny_cfg())
    resident = alg.build_resident()
    state = alg.init_server()
    assert {k: tuple(t.shape) for k, t in state.items()} == {"weight": (C, D), "bias": (C,)}
    assert torch.equal(state["weight"], resident.text_features)  # head starts as zero-shot
    msg = alg.broadcast(state, 1, [0, 1])

    r1, ctx = step(alg, resident, 1, msg, {})
    assert not torch.equal(r1.tensors["weight"], state["weight"])  # it did train

    # only C x d + C floats travel each way
    head_bytes = (C * D + C) * 4
    assert bytes_down(alg, msg, 1) == head_bytes
    assert sum(t.numel() * t.element_size() for t in r1.tensors.values()) == head_bytes

    # the cache persists as tensor groups; a second visit moves the labels towards the head
    cache = ctx.state["cache"]
    assert set(cache) == {"features", "soft_labels"} and cache["features"].shape[1] == D
    first_labels = cache["soft_labels"].clone()
    msg2 = Broadcast(2, r1.tensors)
    step(alg, resident, 1, msg2, ctx.state)
    opts = alg.opts
    probs = torch.softmax(opts.label_scale * fst_cbdg.head_logits(r1.tensors, cache["features"]), -1)
    m = opts.label_momentum
    assert torch.allclose(ctx.state["cache"]["soft_labels"], m * first_labels + (1 - m) * probs)

    # the fold is a sample-weighted mean
    r0, _ = step(alg, resident, 0, msg, {})
    acc = alg.merge(alg.accumulate(alg.zero(msg), r0), alg.accumulate(alg.zero(msg), r1))
    mean = alg.finalize(state, acc)
    n0, n1 = r0.num_examples, r1.num_examples
    expect = (n0 * r0.tensors["weight"] + n1 * r1.tensors["weight"]) / (n0 + n1)
    assert torch.allclose(mean["weight"], expect, atol=1e-6)


def test_class_balanced_generation_in_a_client_step():
    alg = fst_cbdg.ALGORITHM(tiny_cfg())
    resident = alg.build_resident()
    msg = alg.broadcast(alg.init_server(), 1, [2])
    result, ctx = step(alg, resident, 2, msg, {})
    hard = ctx.state["cache"]["soft_labels"].argmax(-1)
    counts = torch.bincount(hard, minlength=C)
    assert result.metrics["synthetic"] == float((counts.max() - counts).sum())
    off = fst_cbdg.ALGORITHM(tiny_cfg(**{"algorithm.options.generation": "false"}))
    assert step(off, resident, 2, msg, {})[0].metrics["synthetic"] == 0.0


# --- whole runs ------------------------------------------------------------------------

def run_cli(out, **extra):
    from raysim.cli import main

    assert main(["run", CONFIG, *tiny_overrides(**extra), "--out", str(out), "--quiet"]) == 0
    return out, [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    return run_cli(tmp_path_factory.mktemp("fst") / "local")


def check_run(out, records):
    head_bytes = (C * D + C) * 4
    assert [r["round"] for r in records] == [0, 1, 2]
    zero_shot = records[0]["zero_shot_accuracy"]
    assert records[0]["accuracy"] == zero_shot  # round 0 is the zero-shot head
    assert 0.0 < zero_shot < 1.0 and all(r["zero_shot_accuracy"] == zero_shot for r in records)
    assert records[-1]["accuracy"] >= zero_shot - 0.05
    for r in records[1:]:
        assert r["bytes_up"] == r["bytes_down"] == head_bytes * len(r["clients"])
    assert (out / "head.safetensors").is_file() and (out / "summary.json").is_file()


def test_local_mode_run(local_run):
    check_run(*local_run)


