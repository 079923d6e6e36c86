"""Worker groups per client family (raysim/run/groups.py, actors/pool.py): config checks, the
client -> group mapping, and CreamFL runs on Ray where each kind of client has its own
group of actors, compared with local mode."""
import json
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from raysim import cli
from raysim.run import groups
from raysim.algorithms import creamfl
from raysim.config import ConfigError, load_config
from tests.test_creamfl import small as six_creamfl_clients

ROOT = Path(__file__).resolve().parents[1]
CREAMFL = str(ROOT / "configs" / "creamfl.yaml")
QUICK = str(ROOT / "configs" / "quickstart.yaml")


def small(*extra: str) -> list[str]:
    """Six CreamFL clients: 0-1 image-only, 2-3 text-only, 4-5 image-text; tiny models
    (tests/test_creamfl.py's setting), 2 rounds."""
    return six_creamfl_clients("rounds=2", *extra)


TWO_GROUPS = (
    "runtime.worker_groups=[{name: vision, families: [image], num_workers: 1, num_cpus: 0.5},"
    " {name: text, families: [text, image_text], num_workers: 1, num_cpus: 0.25}]"
)


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- config


def config_error(*overrides: str, config: str = CREAMFL) -> str:
    with pytest.raises(ConfigError) as e:
        load_config(config, small(*overrides))
    return str(e.value)


def test_a_family_in_two_groups_an_empty_family_list_and_the_reserved_name_are_errors():
    msg = config_error(
        "runtime.worker_groups=[{name: a, families: [image]}, {name: b, families: [text, image]}]"
    )
    assert "runtime.worker_groups[1].families: family 'image' is already served by group 'a'" in msg
    msg = config_error("runtime.worker_groups=[{name: a, families: []}]")
    assert "- runtime.worker_groups.0.families: List should have at least 1 item" in msg
    msg = config_error("runtime.worker_groups=[{name: default, families: [image]}]")
    assert "runtime.worker_groups[0].name: 'default' is the group of runtime.num_workers" in msg
    msg = config_error("runtime.worker_groups=[{name: a, families: [image]}, {name: a, families: [text]}]")
    assert "the name 'a' is used by 2 groups" in msg
    msg = config_error("runtime.worker_groups=[{name: Big_GPU, families: [image], num_gpus: -1, colour: red}]")
    for needle in ("runtime.worker_groups.0.name", "runtime.worker_groups.0.num_gpus", "runtime.worker_groups.0.colour"):
        assert needle in msg, needle


def test_unknown_family_exits_2_naming_the_key_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "run"
    bad = "runtime.worker_groups=[{name: vision, families: [images]}]"
    assert cli.main(["run", CREAMFL, *small(bad), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert CREAMFL in err and "Traceback" not in err
    assert (
        "runtime.worker_groups[0].families: 'images' is not a client family of algorithm creamfl; "
        "its families: image, text, image_text" in err
    )
    assert not out.exists()
    # an algorithm without families has the one family "default"
    assert cli.main(["run", QUICK, "runtime.num_workers=0", bad, "--out", str(out), "--quiet"]) == 2
    assert "its families: default" in capsys.readouterr().err


def test_groups_and_the_client_to_group_mapping():
    cfg = load_config(CREAMFL, small("runtime.num_workers=3", "runtime.worker_groups=[{name: vision, families: [image], num_gpus: 0.5, resources: {a100: 1}}]"))
    alg = creamfl.CreamFL(cfg)
    assert [alg.client_family(c) for c in range(6)] == ["image"] * 2 + ["text"] * 2 + ["image_text"] * 2
    resolved, client_group = groups.resolve(cfg, alg)
    # the named group first; the default group (runtime.num_workers, *_per_worker) serves the rest
    assert [(g.name, g.num_workers, g.num_gpus, g.resources, g.families, g.clients) for g in resolved] == [
        ("vision", 1, 0.5, {"a100": 1.0}, ("image",), 2),
        ("default", 3, 0.0, {}, ("text", "image_text"), 4),
    ]
    assert client_group == [0, 0, 1, 1, 1, 1]
    # every family has its group: no default group; a family without clients starts no actors
    cfg = load_config(
        CREAMFL,
        small(
            "algorithm.options.kinds={image: 0.5, text: 0.5, image_text: 0.0}",
            "runtime.worker_groups=[{name: a, families: [image]}, {name: b, families: [text]}, {name: c, families: [image_text]}]",
        ),
    )
    resolved, client_group = groups.resolve(cfg, creamfl.CreamFL(cfg))
    assert [g.name for g in resolved] == ["a", "b"] and client_group == [0, 0, 0, 1, 1, 1]
    # no worker_groups: one default group of every client, as before
    cfg = load_config(QUICK, ["clients.total=5", "clients.per_round=2", "runtime.num_workers=2"])
    resolved, client_group = groups.resolve(cfg, object())
    assert [(g.name, g.num_workers, g.families, g.clients) for g in resolved] == [("default", 2, ("default",), 5)]
    assert client_group == [0] * 5


# ----------------------------------------------------------------------------- Ray runs


def test_each_client_runs_only_on_its_groups_workers_and_matches_local_mode(tmp_path, ray_cluster):
    local, grouped = tmp_path / "local", tmp_path / "grouped"
    over = small(TWO_GROUPS, "runtime.num_workers=1", "runtime.warm_start=false")
    threads = torch.get_num_threads()
    # One thread in this process, like the workers (runtime.torch_threads=1): local mode's
    # clients and both runs' driver (the round loop runs in this process) compute in the
    # same float order as the workers.
    torch.set_num_threads(1)
    try:
        assert cli.main(["run", CREAMFL, *small(TWO_GROUPS), "--out", str(local), "--quiet"]) == 0
        assert cli.main(["run", CREAMFL, *over, "--out", str(grouped), "--quiet"]) == 0
    finally:
        torch.set_num_threads(threads)

    rl, rg = records(local), records(grouped)
    assert [r["clients"] for r in rg] == [r["clients"] for r in rl] == [[], [0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 4, 5]]
    for rec in rg[1:]:
        # image-only clients on the vision group's actor, the others on the text group's
        assert rec["served_by"] == {"text-0": [2, 3, 4, 5], "vision-0": [0, 1]}
        assert rec["workers"] == 2
    assert "served_by" not in rl[1]
    for x, y in zip(rl, rg):
        for k in ("i2t_r1", "t2i_r1", "accuracy", "server_public_loss", "train_loss"):
            assert (k in x) == (k in y) and x.get(k) == y.get(k), k
    a = load_file(str(local / "checkpoints" / "round-00002" / "server.safetensors"))
    b = load_file(str(grouped / "checkpoints" / "round-00002" / "server.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # two actors, one per group: the default group (runtime.num_workers) never started
    summary = json.loads((grouped / "summary.json").read_text())
    assert len(summary["peak_rss_mb_by_process"]["workers"]) == 2


def test_a_dead_workers_clients_rerun_in_its_own_group(tmp_path, ray_cluster):
    """Group "vision" has two workers; one is SIGKILLed between rounds and not restarted: its
    image clients re-run on the other vision worker, never on the text group's."""
    from raysim.run.engine import Engine

    cfg = load_config(
        CREAMFL,
        small(
            "runtime.worker_groups=[{name: vision, families: [image], num_workers: 2, num_cpus: 0.25},"
            " {name: text, families: [text, image_text], num_workers: 1, num_cpus: 0.5}]",
            "runtime.num_workers=1",
            "runtime.warm_start=false",
            "runtime.max_worker_restarts=0",
            "eval.every=100",
        ),
    )
    engine = Engine(cfg, str(tmp_path / "run"), False)
    try:
        engine.start()
        assert engine.pool.labels == ["vision-0", "vision-1", "text-0"]
        # the actors hold their groups' CPUs: 2 x 0.25 + 0.5
        deadline = time.monotonic() + 30
        total = ray_cluster.cluster_resources()["CPU"]
        while total - ray_cluster.available_resources().get("CPU", 0.0) != pytest.approx(1.0):
            assert time.monotonic() < deadline, ray_cluster.available_resources()
            time.sleep(0.2)
        first = engine.run_round()
        # sticky within the group: client c on the (c mod 2)-th vision worker
        assert first["served_by"] == {"text-0": [2, 3, 4, 5], "vision-0": [0], "vision-1": [1]}
        victim = engine.pool.labels.index("vision-0")
        os.kill(engine.pool.pids()[victim], signal.SIGKILL)
        second = engine.run_round()
        assert second["worker_failures"] == 1 and second["requeued"] == [0]
        assert second["served_by"] == {"text-0": [2, 3, 4, 5], "vision-1": [0, 1]}
        assert second["clients"] == [0, 1, 2, 3, 4, 5]
    finally:
        engine.pool.shutdown()
