"""End-to-end runs: local mode, real Ray actors, resume, heterogeneous ranks, saved artifacts."""
import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_overrides
from raysim.cli import main
from raysim.run.engine import client_metric_means


def run(tmp_path, name, *extra, resume=False, **over):
    out = tmp_path / name
    args = ["run", "configs/quickstart.yaml", *tiny_overrides(**over), *extra, "--out", str(out), "--quiet"]
    if resume:
        args.append("--resume")
    assert main(args) == 0
    return out


def records(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def final_state(out):
    last = sorted((out / "checkpoints").iterdir())[-1]
    return load_file(str(last / "server.safetensors"))


def test_local_run_writes_everything_and_is_deterministic(tmp_path):
    a = run(tmp_path, "a", rounds=3)
    b = run(tmp_path, "b", rounds=3)
    for f in ("config.yaml", "metrics.jsonl", "summary.json", "curves.png", "adapter/adapter_model.safetensors"):
        assert (a / f).is_file(), f
    recs = records(a)
    assert [r["round"] for r in recs] == [0, 1, 2, 3]
    for r in recs[1:]:
        assert len(r["clients"]) == 3 and r["bytes_up"] > 0 and r["bytes_down"] == r["bytes_up"]
        for k in ("accuracy", "i2t_r1", "t2i_r1", "wall_s", "compute_s", "aggregate_s", "eval_s", "checkpoint_s"):
            assert k in r, k
        # fedavg's clients report train_loss and their LoRA rank (the config's r for all)
        assert r["client_means"] == {"rank": 8.0, "train_loss": r["train_loss"]}
    summary = json.loads((a / "summary.json").read_text())
    assert summary["algorithm"] == "fedavg" and summary["rounds"] == 3 and summary["peak_rss_mb"] > 100
    assert summary["final"]["accuracy"] == recs[-1]["accuracy"]
    assert summary["initial"]["accuracy"] == recs[0]["accuracy"]
    # the adapter moved away from its start, and a second run with the seed is identical
    assert [r["accuracy"] for r in recs] == [r["accuracy"] for r in records(b)]
    sa, sb = final_state(a), final_state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert len(list((a / "checkpoints").iterdir())) == 3
    assert list((a / "checkpoints").iterdir())[0].name.startswith("round-")


def test_client_metric_means_skip_nan_and_non_numbers():
    client_metrics = {
        3: {"train_loss": 1.0, "kept_fraction": 0.5},
        1: {"train_loss": float("nan"), "kept_fraction": 1.0, "note": "text"},
        7: {"train_loss": 2.0},
    }
    assert client_metric_means(client_metrics) == {"kept_fraction": 0.75, "train_loss": 1.5}
    assert client_metric_means({}) == {}


def test_ray_pool_writes_a_timeline_and_every_workers_memory(tmp_path, ray_cluster):
    # local mode == the Ray pool, bit for bit at 1 thread: tests/test_algorithm_contract.py
    timeline = tmp_path / "timeline.json"
    over = {"rounds": 2, "runtime.num_workers": 2, "runtime.warm_start": "false"}
    pooled = run(tmp_path, "pooled", "--timeline", str(timeline), **over)
    events = json.loads(timeline.read_text())
    assert sum(e.get("name") == "run" for e in events) >= 2  # the workers' client batches
    assert [r["round"] for r in records(pooled)] == [0, 1, 2]
    summary = json.loads((pooled / "summary.json").read_text())
    assert len(summary["peak_rss_mb_by_process"]["workers"]) == 2


def test_warm_start_auto_only_when_the_driver_has_a_core_to_spare(monkeypatch):
    from types import SimpleNamespace as NS

    from raysim.run import engine

    def rt(**k):
        return NS(**({"placement": "pooled", "warm_start": None, "ray_address": None} | k))

    two_workers = [NS(num_workers=2, num_cpus=1.0)]
    monkeypatch.setattr(engine.os, "cpu_count", lambda: 2)
    assert not engine._warm_start(rt(), two_workers)  # the workers take both cores
    assert engine._warm_start(rt(warm_start=True), two_workers)  # asked for: on
    assert engine._warm_start(rt(ray_address="ray://head:10001"), [NS(num_workers=16, num_cpus=1.0)])  # their own nodes
    assert not engine._warm_start(rt(placement="dedicated", warm_start=True), two_workers)  # one actor per client
    monkeypatch.setattr(engine.os, "cpu_count", lambda: 4)
    assert engine._warm_start(rt(), two_workers)  # two cores left for the driver
    assert engine._warm_start(rt(), [NS(num_workers=2, num_cpus=1.0), NS(num_workers=1, num_cpus=1.5)])  # 3.5 < 4
    assert not engine._warm_start(rt(), [NS(num_workers=2, num_cpus=1.0), NS(num_workers=2, num_cpus=1.0)])
    assert not engine._warm_start(rt(warm_start=False), two_workers)
    # never under SecAgg, where a client in the driver's process would show it its plain update
    assert not engine._warm_start(rt(ray_address="ray://head:10001"), [NS(num_workers=16, num_cpus=1.0)], True)


def test_warm_start_and_secure_aggregation_together_are_a_config_error():
    from raysim.config import ConfigError, load_config

    over = ["privacy.secure_aggregation=true", "runtime.warm_start=true"]
    with pytest.raises(ConfigError, match=r"runtime.warm_start trains clients in the driver's process"):
        load_config("configs/quickstart.yaml", over)
    assert load_config("configs/quickstart.yaml", over[:1]).runtime.warm_start is None  # unset: resolved to off


def test_warm_start_serves_clients_in_the_driver_until_workers_are_ready(tmp_path, ray_cluster):
    """The first rounds run in the driver's process while the workers import torch and build
    their models; then the workers take over from the client states the driver wrote, and
    compute exactly what local mode computes from them."""
    import shutil
    import time

    from actors.pool import LocalPool
    from raysim.config import load_config
    from raysim.run.engine import Engine
    from raysim.run.seeding import derive_seed

    over = tiny_overrides(**{"rounds": 500, "clients.per_round": 5, "runtime.num_workers": 2, "eval.every": 1000,
                             "runtime.warm_start": "true"})  # auto would leave it off on 2 cores
    warm = Engine(load_config("configs/quickstart.yaml", over), str(tmp_path / "warm"), False)
    warm.start()
    served, deadline = [], time.monotonic() + 600
    while not warm.pool.refresh():  # no worker ready yet: this round runs in the driver
        served.append(warm.run_round()["workers"])
        assert time.monotonic() < deadline, f"no worker became ready in {len(served)} rounds"
    assert served and set(served) == {0}  # the driver served the rounds before the handover

    # The next round, computed by local mode (1 thread, like the workers) on a copy of the states
    r = warm.round + 1
    ids, _ = warm._sample(r)
    msg = warm.algorithm.broadcast(warm.state, r, ids)
    shutil.copytree(warm.run.client_state, tmp_path / "states")
    torch.set_num_threads(1)
    local = LocalPool(warm.guarded, lambda rr, c: derive_seed(warm.cfg.seed, rr, c), str(tmp_path / "states"))
    out = local.run_round(msg, ids, {c: warm.versions[c] for c in ids if c in warm.versions})
    expected = warm.guarded.finalize(warm.state, out.acc, r, msg, out.accepted, out.late, local.client_call).state

    rec = warm.run_round()  # the remote workers' first round
    assert rec["workers"] >= 1 and rec["clients"] == ids
    assert all(torch.equal(expected[k], warm.state[k]) for k in expected)
    assert warm.run_round()["workers"] >= 1
    warm.pool.shutdown()


def test_dedicated_placement_one_actor_per_client(tmp_path, ray_cluster):
    out = run(
        tmp_path,
        "dedicated",
        **{
            "clients.total": 3,
            "clients.per_round": 2,
            "runtime.num_workers": 1,
            "runtime.placement": "dedicated",
            "runtime.num_cpus_per_worker": 0.5,
        },
    )
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["peak_rss_mb_by_process"]["workers"]) == 3
    assert records(out)[-1]["round"] == 2
    # the three client actors were placed through one placement group of three bundles
    groups = [g for g in ray_cluster.util.placement_group_table().values() if g["name"] == "raysim-clients"]
    assert groups and all(len(g["bundles"]) == 3 for g in groups)
    assert all(b == {"CPU": 0.5} for g in groups for b in g["bundles"].values())


def test_resume_gives_the_uninterrupted_result(tmp_path):
    full = run(tmp_path, "full", rounds=4)
    part = run(tmp_path, "part", rounds=2)
    run(tmp_path, "part", resume=True, rounds=4)
    assert [r["round"] for r in records(part)] == [0, 1, 2, 3, 4]
    assert [r.get("accuracy") for r in records(part)] == [r.get("accuracy") for r in records(full)]
    sf, sp = final_state(full), final_state(part)
    assert all(torch.equal(sf[k], sp[k]) for k in sf)


def test_heterogeneous_ranks_product_and_hetlora(tmp_path):
    for mode in ("product", "hetlora"):
        out = run(tmp_path, mode, **{"lora.client_ranks": "[2,4,8]", "algorithm.lora_aggregation": mode})
        recs = records(out)
        ranks = {int(r) for r in recs[-1]["clients"]}
        assert ranks  # clients ran
        state = final_state(out)
        a_keys = [k for k in state if k.endswith("lora_A.weight")]
        assert a_keys and all(state[k].shape[0] == 8 for k in a_keys)  # global adapter at r_max
        assert all(torch.isfinite(t).all() for t in state.values())


def test_fedprox_runs_and_differs_from_fedavg(tmp_path):
    avg = run(tmp_path, "avg")
    prox = run(tmp_path, "prox", **{"algorithm.name": "fedprox", "algorithm.mu": 1.0})
    sa, sp = final_state(avg), final_state(prox)
    assert any(not torch.equal(sa[k], sp[k]) for k in sa)


def test_final_adapter_loads_with_peft_and_reproduces_final_metrics(tmp_path):
    from peft import PeftModel

    from models.clip import load_dual_encoder
    from raysim.config import load_config
    from raysim.data import FederatedData
    from raysim.lora.evaluate import evaluate_dual_encoder

    out = run(tmp_path, "final")
    model = PeftModel.from_pretrained(load_dual_encoder(str(out / "base_model")), str(out / "adapter"))
    cfg = load_config(out / "config.yaml")
    data = FederatedData(cfg)
    metrics = evaluate_dual_encoder(model, data, 256)
    summary = json.loads((out / "summary.json").read_text())
    assert metrics["accuracy"] == pytest.approx(summary["final"]["accuracy"], abs=1e-6)


def test_pretrained_checkpoint_directory_as_base(tmp_path):
    """model.kind=pretrained loads any dual-encoder directory with from_pretrained."""
    from transformers import VisionTextDualEncoderConfig, VisionTextDualEncoderModel

    from models.clip import build_tiny_clip, load_dual_encoder
    from raysim.config import load_config
    from raysim.data import FederatedData
    from raysim.pretrain import base_config

    cfg = load_config("configs/quickstart.yaml", tiny_overrides())
    data = FederatedData(cfg)
    clip_dir = tmp_path / "clip"
    build_tiny_clip(base_config(cfg, data), seed=3).save_pretrained(str(clip_dir))
    # a VisionTextDualEncoder checkpoint loads through the same function
    clip = load_dual_encoder(str(clip_dir))
    vtde = VisionTextDualEncoderModel(
        VisionTextDualEncoderConfig.from_vision_text_configs(clip.config.vision_config, clip.config.text_config, projection_dim=32)
    )
    vtde.save_pretrained(str(tmp_path / "vtde"))
    assert type(load_dual_encoder(str(tmp_path / "vtde"))).__name__ == "VisionTextDualEncoderModel"
    out = run(tmp_path, "pre", **{"model.kind": "pretrained", "model.path": str(clip_dir)})
    assert (out / "base_model" / "config.json").is_file()
    assert records(out)[-1]["round"] == 2
