"""CreamFL (raysim/algorithms/creamfl.py): ensemble fold by hand and against the
all-at-once formula, regulariser signs and targets, the algorithm contract, a Ray run."""
import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from actors.protocol import ClientContext, ClientResult
from conftest import assert_same
from raysim import cli
from raysim.algorithms import creamfl
from raysim.algorithms import options_of
from raysim.config import ConfigError, load_config

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "creamfl.yaml")
N, D = 24, 16  # public set size and representation dim of the small configs


pytestmark = pytest.mark.usefixtures("one_thread")


def small(*extra: str) -> list[str]:
    """Six clients, two of each kind (0-1 image, 2-3 text, 4-5 image-text), tiny models."""
    return [
        "clients.total=6",
        "clients.per_round=6",
        "algorithm.options.kinds={image: 0.334, text: 0.333, image_text: 0.333}",
        f"algorithm.options.public_size={N}",
        "algorithm.options.client_width=16",
        "algorithm.options.public_batch_size=8",
        "algorithm.options.server_batch_size=12",
        f"model.projection_dim={D}",
        "model.hidden_size=32",
        "model.num_layers=1",
        "model.intermediate_size=64",
        "train.local_epochs=1",
        "runtime.num_workers=0",
        *extra,
    ]


def make(*extra: str) -> creamfl.CreamFL:
    return creamfl.CreamFL(load_config(CONFIG, small(*extra)))


# ----------------------------------------------------------------------------- options


def test_kinds_are_fractions_assigned_in_blocks():
    assert creamfl.kind_blocks({"image": 0.35, "text": 0.35, "image_text": 0.3}, 20) == ["image"] * 7 + ["text"] * 7 + [
        "image_text"
    ] * 6
    # largest remainder: 10 * (0.25, 0.25, 0.5) = 2.5, 2.5, 5 -> the first tie wins the spare client
    assert creamfl.kind_blocks({"image": 0.25, "text": 0.25, "image_text": 0.5}, 10).count("image") == 3
    assert creamfl.kind_blocks({"image_text": 1.0}, 4) == ["image_text"] * 4
    with pytest.raises(ConfigError, match=r"algorithm.options.kinds: .*summing to 1"):
        options_of(load_config(CONFIG, ["algorithm.options.kinds={image: 0.5, text: 0.2}"]))
    with pytest.raises(ConfigError, match=r"unknown client kinds \['audio'\]"):
        options_of(load_config(CONFIG, ["algorithm.options.kinds={image: 0.5, audio: 0.5}"]))
    with pytest.raises(ConfigError, match=r"algorithm.options.temperature: unknown key"):
        options_of(load_config(CONFIG, ["algorithm.options.temperature=0.5"]))


# ----------------------------------------------------------------------------- ensemble


def result(cid, **reps):
    return ClientResult(cid, 1, reps)


def fold(alg, globals_, groups):
    """Each group is one worker's clients; partials merged in the given order."""
    msg = creamfl.Broadcast(1, globals_)
    total = alg.zero(msg)
    for group in groups:
        acc = alg.zero(msg)
        for r in group:
            acc = alg.accumulate(acc, r)
        total = alg.merge(total, acc)
    return {m: creamfl.ens_result(e) for m, e in total.parts.items()}


def test_ensemble_by_hand():
    alg = creamfl.CreamFL(load_config(CONFIG, ["algorithm.options.public_size=2"]))
    g_text = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # Client 0 matches each image to its own caption, client 1 to the other one.
    a, b = torch.tensor([[1.0, 0.0], [0.0, 1.0]]), torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    # s_0j = 1 - log(e + 1) = -0.3133, s_1j = 0 - log(1 + e) = -1.3133 for both samples
    assert creamfl.pair_scores(a, g_text).tolist() == pytest.approx([-0.31326169, -0.31326169])
    assert creamfl.pair_scores(b, g_text).tolist() == pytest.approx([-1.31326169, -1.31326169])
    # weights softmax(-0.3133, -1.3133) = (e, 1) / (e + 1) = (0.7311, 0.2689)
    ens = fold(alg, {"image": g_text, "text": g_text}, [[result(0, image=a), result(1, image=b)]])
    assert set(ens) == {"image"}  # nobody uploaded text: no text target
    assert ens["image"].tolist() == [pytest.approx([0.7310586, 0.2689414]), pytest.approx([0.2689414, 0.7310586])]
    mean = creamfl.CreamFL(load_config(CONFIG, ["algorithm.options.public_size=2", "algorithm.options.ensemble=mean"]))
    ens = fold(mean, {"image": g_text, "text": g_text}, [[result(0, image=a), result(1, image=b)]])
    assert ens["image"].tolist() == [[0.5, 0.5], [0.5, 0.5]]


def all_at_once(reps: list[torch.Tensor], g_other: torch.Tensor) -> torch.Tensor:
    """The paper's formula with every client's N x d matrix in memory at once."""
    s = torch.stack([torch.log_softmax(r.double() @ g_other.double().T, dim=1).diagonal() for r in reps])  # (K, N)
    w = torch.softmax(s, dim=0)
    return torch.einsum("kn,knd->nd", w, torch.stack(reps).double()).float()


def test_fold_over_partials_equals_the_formula_all_at_once():
    # any split and merge order gives the same: tests/test_algorithm_contract.py
    alg = make()
    gen = torch.Generator().manual_seed(0)
    unit = lambda *shape: F.normalize(torch.randn(*shape, generator=gen), dim=-1)  # noqa: E731
    g = {"image": unit(N, D), "text": unit(N, D)}
    # Scores of scale 40 would overflow a naive sum of exp(s) in float32 and need the running max.
    img = [40 * unit(N, D) for _ in range(4)]
    txt = [40 * unit(N, D) for _ in range(3)]
    results = [
        result(0, image=img[0]),
        result(2, text=txt[0]),
        result(4, image=img[1], text=txt[1]),
        result(5, image=img[2], text=txt[2]),
        result(1, image=img[3]),
    ]
    expected = {"image": all_at_once(img[:3] + img[3:], g["text"]), "text": all_at_once(txt, g["image"])}
    got = fold(alg, g, [results[:2], results[2:]])
    assert got.keys() == expected.keys()
    for m in expected:
        torch.testing.assert_close(got[m], expected[m], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- regulariser


def test_intra_pulls_towards_global_and_away_from_round_start():
    g = torch.tensor([[1.0, 0.0]])
    start = torch.tensor([[0.0, 1.0]])
    at_global = creamfl.intra_loss(g, g, start, tau=0.5)
    # logits [1, 0] / 0.5 = [2, 0], target 0: log(1 + e^-2)
    assert at_global.item() == pytest.approx(math.log(1 + math.exp(-2)))
    assert creamfl.intra_loss(start, g, start, tau=0.5) > at_global  # staying at h~ costs more
    h = F.normalize(torch.tensor([[1.0, 1.0]]), dim=-1).requires_grad_(True)
    creamfl.intra_loss(h, g, start, tau=0.5).backward()
    step = -h.grad[0]  # gradient descent moves h towards G_same and away from h~
    assert step[0] > 0 > step[1]


def test_inter_is_lowest_when_each_feature_picks_its_own_pair():
    g_other = torch.eye(4)
    idx = torch.arange(4)
    aligned = creamfl.inter_loss(g_other, g_other, idx, tau=0.5)
    # logits 2 on the pair, 0 elsewhere: log(1 + 3 e^-2)
    assert aligned.item() == pytest.approx(math.log(1 + 3 * math.exp(-2)))
    shuffled = creamfl.inter_loss(g_other[[1, 2, 3, 0]], g_other, idx, tau=0.5)
    assert shuffled > aligned
    # a sub-batch of public ids is scored against all N other-modality features
    part = creamfl.inter_loss(g_other[[2, 0]], g_other, torch.tensor([2, 0]), tau=0.5)
    assert part.item() == pytest.approx(aligned.item())


# ----------------------------------------------------------------------------- contract


def test_a_round_uploads_each_kinds_representations_and_keeps_client_weights():
    # determinism, pickling, untouched inputs and merge order: tests/test_algorithm_contract.py
    alg = make()
    state = alg.init_server()
    assert_same(alg.state_tensors(make().init_server()), alg.state_tensors(state))  # same seed, same server
    msg = alg.broadcast(state, 1, list(range(6)))
    assert set(msg.tensors) == {"image", "text"} and msg.tensors["image"].shape == (N, D)
    assert torch.allclose(msg.tensors["text"].norm(dim=1), torch.ones(N))
    resident = alg.build_resident()

    acc = alg.zero(msg)
    uploads = {"image": {"image"}, "text": {"text"}, "image_text": {"image", "text"}}
    for cid in (0, 3, 4):  # one client of each kind
        kept = {}
        r1 = alg.client_step(ClientContext(cid, 1, 77, None, resident, kept), msg)
        assert set(r1.tensors) == uploads[alg.kind_of_client[cid]]
        assert r1.num_examples == len(alg.data.client(cid)) > 0
        assert r1.metrics["train_loss"] > 0 and r1.metrics["reg_loss"] > 0
        for reps in r1.tensors.values():
            assert reps.shape == (N, D) and torch.allclose(reps.norm(dim=1), torch.ones(N))
        # the client's own weights persist on its worker, as safetensors-ready groups
        assert set(kept) == {"model"} and all(isinstance(t, torch.Tensor) for t in kept["model"].values())
        towers = {k.split(".")[0] for k in kept["model"]}
        assert towers >= uploads[alg.kind_of_client[cid]] and ("head" in towers) == (cid != 4)
        fresh = alg.client_model(cid).state_dict()
        assert any(not torch.equal(kept["model"][k], fresh[k]) for k in fresh)
        if cid == 3:  # round 2 starts from the kept weights, not the seeded initial ones
            again = alg.client_step(ClientContext(cid, 2, 78, None, resident, dict(kept)), msg)
            restart = alg.client_step(ClientContext(cid, 2, 78, None, resident, {}), msg)
            assert not torch.equal(again.tensors["text"], restart.tensors["text"])
        acc = alg.accumulate(acc, r1)
    assert alg.bytes_down(msg, 0) == 2 * N * D * 4

    new = alg.finalize(state, acc)
    assert int(new["meta"]["round"]) == 1
    assert not torch.equal(new["global"]["image"], state["global"]["image"])
    flat = alg.state_tensors(new)
    assert_same(alg.state_tensors(alg.load_state_tensors(flat)), flat)
    metrics = alg.evaluate(new)
    assert set(metrics) == {"i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "accuracy", "server_public_loss"}
    assert all(0.0 <= metrics[k] <= 1.0 for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "accuracy"))
    assert metrics["i2t_r5"] >= metrics["i2t_r1"] and metrics["t2i_r5"] >= metrics["t2i_r1"]


def test_distillation_moves_the_server_towards_the_ensemble():
    alg = make("algorithm.options.distill_epochs=3", "algorithm.options.server_lr=0.01")
    state = alg.init_server()
    target = {m: F.normalize(torch.randn(N, D, generator=torch.Generator().manual_seed(1)), dim=-1) for m in ("image", "text")}
    model = copy.deepcopy(alg._server)
    model.load_state_dict(state["server"])
    before = {m: F.mse_loss(creamfl.encode_public(model, alg.public)[m], target[m]).item() for m in target}
    loss = creamfl.server_distill(model, alg.public, {"image": target["image"]}, alg.opts, seed=3)
    after = creamfl.encode_public(model, alg.public)
    assert loss > 0
    assert F.mse_loss(after["image"], target["image"]).item() < before["image"]
    # only the modality with a target is distilled: the text tower gets no gradient
    assert F.mse_loss(after["text"], target["text"]).item() == pytest.approx(before["text"])


def test_server_only_and_no_regulariser_modes():
    alg = make("algorithm.options.server_only=true")
    state = alg.init_server()
    msg = alg.broadcast(state, 1, [0])
    r = alg.client_step(ClientContext(0, 1, 5, None, alg.build_resident(), {}), msg)
    assert msg.tensors == {} and r.tensors == {} and r.num_examples == 0 and alg.bytes_down(msg, 0) == 0
    new = alg.finalize(state, alg.accumulate(alg.zero(msg), r))
    assert int(new["meta"]["round"]) == 1  # the server still takes its public pass

    plain = make("algorithm.options.regularizer=false")
    state = plain.init_server()
    msg = plain.broadcast(state, 1, [4])
    r = plain.client_step(ClientContext(4, 1, 5, None, plain.build_resident(), {}), msg)
    assert math.isnan(r.metrics["reg_loss"]) and set(r.tensors) == {"image", "text"}
    assert plain.bytes_down(msg, 4) == 0


# ----------------------------------------------------------------------------- Ray run


def test_two_rounds_on_ray_with_all_three_client_kinds(ray_cluster, tmp_path):
    run = tmp_path / "ray"
    overrides = small("rounds=2", "checkpoint.every=1", "runtime.num_workers=2")
    assert cli.main(["run", CONFIG, *overrides, "--out", str(run), "--quiet"]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    assert records[1]["clients"] == [0, 1, 2, 3, 4, 5]
    # up: N x d float32 per modality held (2 image-only + 2 text-only + 2 x 2 image-text);
    # down: G_I and G_T to each of the 6 clients
    assert records[1]["bytes_up"] == 8 * N * D * 4
    assert records[1]["bytes_down"] == 6 * 2 * N * D * 4
    for rec in records:
        assert all(0.0 <= rec[k] <= 1.0 for k in ("i2t_r1", "i2t_r5", "t2i_r1", "t2i_r5", "accuracy"))
    assert records[2]["server_public_loss"] < records[0]["server_public_loss"]
    assert records[1]["train_loss"] > 0

    ckpt = load_file(str(run / "checkpoints" / "round-00002" / "server.safetensors"))
    assert {k.split("/")[0] for k in ckpt} == {"server", "global", "meta"}
    assert ckpt["global/image"].shape == (N, D) and int(ckpt["meta/round"]) == 2
    image_only = load_file(str(run / "client_state" / "000000" / "r2.safetensors"))
    both = load_file(str(run / "client_state" / "000005" / "r2.safetensors"))
    assert any(k.startswith("model/image.") for k in image_only) and not any(k.startswith("model/text.") for k in image_only)
    assert any(k.startswith("model/text.") for k in both) and any(k.startswith("model/image.") for k in both)
