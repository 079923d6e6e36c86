"""M-Fed (raysim/algorithms/mfed.py): contract, grouped aggregation by hand, a Ray run."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from actors.protocol import ClientContext, ClientResult
from models import multitask as mt
from conftest import assert_same, clone_all
from raysim import cli
from raysim.algorithms.mfed import MFed, TaskAssignmentError, flatten
from raysim.algorithms import options_of
from raysim.config import ConfigError, load_config

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "mfed.yaml")
TASKS_4 = "{classify: 2, regress: 1, denoise: 1}"  # clients 0-1 classify, 2 regress, 3 denoise


pytestmark = pytest.mark.usefixtures("one_thread")


def small(*extra: str) -> list[str]:
    return [
        "clients.total=4",
        "clients.per_round=4",
        f"algorithm.options.tasks={TASKS_4}",
        "model.hidden_size=16",
        "train.local_epochs=1",
        "train.lr=0.005",
        "runtime.num_workers=0",
        *extra,
    ]


def make(*extra: str) -> MFed:
    return MFed(load_config(CONFIG, small(*extra)))


# ----------------------------------------------------------------------------- options


def test_task_counts_must_add_up_to_clients_total():
    cfg = load_config(CONFIG, small("clients.total=5"))
    with pytest.raises(ValueError, match=r"assigns 4 clients but clients.total is 5"):
        MFed(cfg)
    assert issubclass(TaskAssignmentError, ConfigError)  # the CLI prints it without a traceback


def test_unknown_task_and_key_are_rejected_at_load():
    with pytest.raises(ConfigError, match=r"algorithm.options.tasks: unknown tasks \['segment'\]"):
        options_of(load_config(CONFIG, small("algorithm.options.tasks={classify: 3, segment: 1}")))
    with pytest.raises(ConfigError, match=r"algorithm.options.pull: unknown key"):
        options_of(load_config(CONFIG, small("algorithm.options.pull=0.1")))


def test_tasks_are_assigned_in_blocks_in_canonical_order():
    alg = make("algorithm.options.tasks={denoise: 1, regress: 1, classify: 2}")
    assert alg.task_of_client == ["classify", "classify", "regress", "denoise"]


# ----------------------------------------------------------------------------- contract


@pytest.mark.parametrize(
    "extra, uploads",
    [
        ((), {"encoder", "decoder.classify"}),
        (("algorithm.options.mode=task_fedavg",), {"encoder.classify", "decoder.classify"}),
        (("algorithm.options.mode=local",), set()),
        (("algorithm.options.encoder_lora=true", "algorithm.options.pull_space=output"), {"encoder", "decoder.classify"}),
    ],
    ids=["mfed", "task_fedavg", "local", "mfed_lora_output_pull"],
)
def test_uploads_kept_state_and_fold_per_mode(extra, uploads):
    # determinism, pickling, untouched inputs and merge order: tests/test_algorithm_contract.py
    alg = make(*extra)
    state = alg.init_server()
    msg = alg.broadcast(state, 1, [0, 1, 2, 3])
    resident = alg.build_resident()

    def step(algorithm, client_state):
        return algorithm.client_step(ClientContext(1, 1, 1234, None, resident, client_state), msg)

    client_state = {}
    r1 = step(alg, client_state)
    assert {k.split("/")[0] for k in r1.tensors} == uploads
    assert r1.num_examples == len(alg.data.client(1)) > 0
    assert 0.0 <= r1.metrics["test_accuracy"] <= 1.0
    # what persists on the worker: the client's own decoder, and its encoder when training alone
    assert set(client_state) == ({"encoder", "decoder"} if alg.opts.mode == "local" else {"decoder"})
    if uploads:  # the uploaded decoder is the one kept
        kept = {k.split("/", 1)[1]: t for k, t in r1.tensors.items() if k.startswith("decoder")}
        assert_same(client_state["decoder"], kept)
    for group in client_state.values():
        assert all(isinstance(t, torch.Tensor) for t in group.values())

    new = alg.finalize(state, alg.accumulate(alg.zero(msg), r1))
    assert new["client_eval"]["classify.accuracy"].item() == pytest.approx(r1.metrics["test_accuracy"])
    for group in uploads:  # one client: the new global is its upload (up to the fold's 2**-32 rounding)
        upload = {k[len(group) + 1 :]: t for k, t in r1.tensors.items() if k.startswith(group + "/")}
        assert_same(new[group], upload, atol=1e-9)
    assert_same(alg.state_tensors(alg.load_state_tensors(alg.state_tensors(new))), alg.state_tensors(new))
    metrics = alg.evaluate(new)
    assert set(metrics) == {f"{t}_{m}{s}" for t, m in mt.METRIC.items() for s in ("", "_clients")}
    assert metrics["classify_accuracy_clients"] == pytest.approx(r1.metrics["test_accuracy"])


def test_mfed_client_resumes_from_its_own_decoder():
    alg = make("algorithm.options.decoder_pull=0.5")
    resident = alg.build_resident()
    state = alg.init_server()
    client_state = {}
    alg.client_step(ClientContext(2, 1, 5, None, resident, client_state), alg.broadcast(state, 1, [2]))
    own = clone_all(client_state["decoder"])
    # round 2 with an unchanged global: the step must start from `own`, not the global decoder
    r = alg.client_step(ClientContext(2, 2, 6, None, resident, client_state), alg.broadcast(state, 2, [2]))
    start = alg._start(ClientContext(2, 2, 6, None, resident, {"decoder": own}), alg.broadcast(state, 2, [2]), "regress")
    assert_same(start[1], own)
    assert_same(start[2], state["decoder.regress"])
    assert r.metrics["pull"] > 0


# ----------------------------------------------------------------------------- grouped fold


def result(cid, n, encoder, decoder, metric, task, enc_group="encoder"):
    tensors = flatten({enc_group: {"w": torch.tensor(encoder)}, f"decoder.{task}": {"b": torch.tensor(decoder)}})
    return ClientResult(cid, n, tensors, {f"test_{mt.METRIC[task]}": metric})


def fold(alg, results_by_worker):
    partials = []
    for results in results_by_worker:
        acc = alg.zero(None)
        for r in results:
            acc = alg.accumulate(acc, r)
        partials.append(acc)
    total = alg.zero(None)
    for p in partials:
        total = alg.merge(total, p)
    return total


def fake_state(encoder_groups):
    state = {g: {"w": torch.zeros(2)} for g in encoder_groups}
    state.update({f"decoder.{t}": {"b": torch.tensor([-1.0])} for t in ("classify", "regress", "denoise")})
    return state


def test_mfed_averages_encoder_over_all_clients_and_decoders_within_task():
    alg = make()
    results = [
        result(0, 1, [1.0, 2.0], [10.0], 0.5, "classify"),
        result(1, 3, [3.0, 4.0], [2.0], 0.7, "classify"),
        result(2, 4, [5.0, 6.0], [7.0], 0.2, "regress"),
    ]  # client 3 (denoise) sat this round out
    state = fake_state(["encoder"])
    for split in ([results], [[results[0], results[2]], [results[1]]]):  # one worker, or two partials
        new = alg.finalize(state, fold(alg, split))
        # encoder: (1*[1,2] + 3*[3,4] + 4*[5,6]) / 8 = [30, 38] / 8
        assert new["encoder"]["w"].tolist() == [3.75, 4.75]
        assert new["decoder.classify"]["b"].tolist() == [4.0]  # (1*10 + 3*2) / 4
        assert new["decoder.regress"]["b"].tolist() == [7.0]
        assert new["decoder.denoise"]["b"].tolist() == [-1.0]  # no upload: unchanged
        assert new["client_eval"]["classify.accuracy"].item() == pytest.approx(0.6)  # mean over clients
        assert new["client_eval"]["regress.r2"].item() == pytest.approx(0.2)
    assert state["encoder"]["w"].tolist() == [0.0, 0.0]


def test_task_fedavg_averages_encoders_within_each_task():
    alg = make("algorithm.options.mode=task_fedavg")
    results = [
        result(0, 1, [1.0, 2.0], [10.0], 0.5, "classify", "encoder.classify"),
        result(1, 3, [3.0, 4.0], [2.0], 0.7, "classify", "encoder.classify"),
        result(2, 4, [5.0, 6.0], [7.0], 0.2, "regress", "encoder.regress"),
    ]
    new = alg.finalize(fake_state(["encoder.classify", "encoder.regress", "encoder.denoise"]), fold(alg, [results]))
    assert new["encoder.classify"]["w"].tolist() == [2.5, 3.5]  # (1*[1,2] + 3*[3,4]) / 4
    assert new["encoder.regress"]["w"].tolist() == [5.0, 6.0]
    assert new["encoder.denoise"]["w"].tolist() == [0.0, 0.0]
    assert new["decoder.classify"]["b"].tolist() == [4.0]


def test_upload_of_another_tasks_decoder_is_refused():
    alg = make()
    with pytest.raises(ValueError, match=r"client 0 \(classify\) uploaded groups \['decoder.regress', 'encoder'\]"):
        alg.accumulate(alg.zero(None), result(0, 1, [1.0, 2.0], [1.0], 0.5, "regress"))


# ----------------------------------------------------------------------------- Ray run


def test_two_rounds_on_ray_with_three_tasks(ray_cluster, tmp_path):
    overrides = small("rounds=2", "checkpoint.every=1")
    assert cli.main(["run", CONFIG, *overrides, "runtime.num_workers=2", "--out", str(tmp_path / "ray"), "--quiet"]) == 0
    run = tmp_path / "ray"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [0, 1, 2]
    assert records[1]["clients"] == [0, 1, 2, 3]

    # traffic: every client uploads the encoder and its own task's decoder, and downloads the same
    alg = make()
    res = alg.build_resident()
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts.values())  # noqa: E731
    enc, dec = nbytes(res.initial["encoder"]), {t: nbytes(res.initial[f"decoder.{t}"]) for t in mt.TASKS}
    expected = 4 * enc + 2 * dec["classify"] + dec["regress"] + dec["denoise"]
    assert records[1]["bytes_up"] == records[1]["bytes_down"] == expected

    first, last = records[0], records[2]
    assert first["classify_accuracy"] < 0.2 and last["classify_accuracy"] > 0.3  # chance is 0.1
    assert last["denoise_psnr"] > first["denoise_psnr"] + 3.0  # dB
    assert last["regress_r2"] > first["regress_r2"]

    ckpt = load_file(str(run / "checkpoints" / "round-00002" / "server.safetensors"))
    assert {k.split("/")[0] for k in ckpt} == {"encoder", "decoder.classify", "decoder.regress", "decoder.denoise", "client_eval"}
    own = load_file(str(run / "client_state" / "000002" / "r2.safetensors"))  # client 2's own regression decoder
    assert {k.split("/")[0] for k in own} == {"decoder"} and own["decoder/fc2.bias"].shape == (1,)
    assert (run / "summary.json").is_file() and (run / "curves.png").is_file()

