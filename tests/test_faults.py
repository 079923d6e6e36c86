"""Faults injected for real: a ClientWorker SIGKILLed mid-round, the whole run killed."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from conftest import tiny_overrides
from raysim.cli import main as cli_main
from raysim.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def engine_for(tmp_path, name, **over):
    from raysim.run.engine import Engine

    cfg = load_config(ROOT / "configs/quickstart.yaml", tiny_overrides(**over))
    return Engine(cfg, str(tmp_path / name), False)


def test_worker_sigkilled_every_round_changes_nothing(tmp_path, ray_cluster):
    # Every client step takes at least 0.3 s, so a kill 0.3 s into the round lands mid-round
    # however fast the machine is; the pause changes no result.
    slow = "{" + ", ".join(f"{c}: 0.3" for c in range(20)) + "}"
    over = {
        "rounds": 6,
        "clients.per_round": 6,
        "train.local_epochs": 1,
        "runtime.num_workers": 2,
        "eval.every": 100,
        "faults.slow_clients": slow,
    }
    # the reference runs without the pauses, which change no result
    clean = engine_for(tmp_path, "clean", **{**over, "faults.slow_clients": "{}"})
    clean.start()
    while not clean.done():
        clean.run_round()
    clean.pool.shutdown()

    faulty = engine_for(tmp_path, "faulty", **over)
    faulty.start()
    kills = 0
    while not faulty.done():
        victim = faulty.round % 2  # alternate, so the other worker is never the one restarting
        pid = faulty.pool.pids()[victim]
        box = {}
        t = threading.Thread(target=lambda: box.setdefault("rec", faulty.run_round()))
        t.start()
        time.sleep(0.3)  # the round is under way: the pids were just asked, the broadcast is out
        os.kill(pid, signal.SIGKILL)
        t.join()
        rec = box["rec"]
        kills += rec["worker_failures"]
        assert rec["worker_failures"] in (0, 1)
        if rec["worker_failures"]:
            assert rec["requeued"] and set(rec["requeued"]) <= set(rec["clients"])
    faulty.pool.shutdown()
    assert kills >= 5, f"only {kills} of 6 kills landed mid-round"
    # every round used the same clients, and the fold is exact: bit-identical models
    for a, b in zip(clean.history, faulty.history):
        assert a["clients"] == b["clients"]
        assert a.get("accuracy") == b.get("accuracy")
    assert clean.state.keys() == faulty.state.keys()
    assert all(torch.equal(clean.state[k], faulty.state[k]) for k in clean.state)


def test_run_killed_at_a_round_resumes_bit_identical(tmp_path):
    args = [*tiny_overrides(rounds=6)]
    full = tmp_path / "full"
    # the uninterrupted reference in this process (a subprocess costs the imports again)
    assert cli_main(["run", str(ROOT / "configs/quickstart.yaml"), *args, "--quiet", "--out", str(full)]) == 0
    cmd = [sys.executable, "-m", "raysim.cli", "run", "configs/quickstart.yaml", *args, "--quiet"]

    killed = tmp_path / "killed"
    proc = subprocess.Popen([*cmd, "--out", str(killed)], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = killed / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline:
        if metrics.is_file() and sum(1 for _ in metrics.open()) >= 4:  # rounds 0..3 done
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = [json.loads(line)["round"] for line in metrics.read_text().splitlines()]
    assert done_before[-1] < 6, "the run finished before it could be killed"

    subprocess.run([*cmd, "--out", str(killed), "--resume"], check=True, cwd=ROOT, capture_output=True, timeout=600)
    recs_full = [json.loads(line) for line in (full / "metrics.jsonl").read_text().splitlines()]
    recs_resumed = [json.loads(line) for line in metrics.read_text().splitlines()]
    assert [r["round"] for r in recs_resumed] == list(range(7))
    assert [r.get("accuracy") for r in recs_resumed] == [r.get("accuracy") for r in recs_full]
    from safetensors.torch import load_file

    a = load_file(str(full / "checkpoints/round-00006/server.safetensors"))
    b = load_file(str(killed / "checkpoints/round-00006/server.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def _records(out: Path) -> list[dict]:
    # every key but the time breakdown (wall_s, compute_s, ...), which differs run to run
    # and where the clients ran (Ray's workers or the driver's process)
    return [{k: v for k, v in json.loads(x).items() if not k.endswith("_s") and k not in ("workers", "served_by")}
            for x in (out / "metrics.jsonl").read_text().splitlines()]


def _summary(out: Path) -> dict:
    s = json.loads((out / "summary.json").read_text())
    return {k: v for k, v in s.items() if not k.endswith("_s") and "mb" not in k and "rss" not in k}


def _run(out: Path, *extra: str) -> int:
    """In this process at one torch thread, as Ray's workers train (runtime.torch_threads 1):
    local runs and Ray runs are then bit-identical (tests/test_algorithm_contract.py)."""
    # every client trains every round: each round writes a new state version of each
    over = tiny_overrides(rounds=4, **{"checkpoint.keep_last": 3, "clients.total": 4, "clients.per_round": 4})
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return cli_main(["run", str(ROOT / "configs/quickstart.yaml"), *over, "--quiet", "--out", str(out), *extra])
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def full(tmp_path_factory):
    """The uninterrupted 4-round reference."""
    out = tmp_path_factory.mktemp("full") / "run"
    assert _run(out) == 0
    return out


def test_killed_between_checkpoint_and_record_resumes_with_every_record(tmp_path, monkeypatch, full):
    from raysim.run.run_dir import RunDir

    append = RunDir.append
    for round_ in (2, 4):  # mid-run, and the last round (then only summary.json is missing)
        def die_after_checkpoint(self, record, round_=round_):
            if record["round"] == round_:
                raise KeyboardInterrupt  # as a kill would: the checkpoint is written, the record not
            append(self, record)

        out = tmp_path / f"killed-{round_}"
        with monkeypatch.context() as m:
            m.setattr(RunDir, "append", die_after_checkpoint)
            assert _run(out) == 130
        assert (out / f"checkpoints/round-{round_:05d}").is_dir()
        assert [r["round"] for r in _records(out)] == list(range(round_))
        assert _run(out, "--resume") == 0
        assert _records(out) == _records(full)
        assert _summary(out) == _summary(full)


def test_resume_falls_back_two_checkpoints_when_the_newest_are_garbage(tmp_path, full):
    out = tmp_path / "broken"
    assert _run(out) == 0
    for r in (3, 4):  # the two newest checkpoints: unreadable
        (out / f"checkpoints/round-{r:05d}/server.safetensors").write_bytes(b"garbage")
    assert _run(out, "--resume") == 0  # from round 2: every client's state of round 2 was kept
    assert _records(out) == _records(full)
    from safetensors.torch import load_file

    a = load_file(str(full / "checkpoints/round-00004/server.safetensors"))
    b = load_file(str(out / "checkpoints/round-00004/server.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sigterm_stops_cleanly_and_resumes_bit_identical(tmp_path, full):
    """Kubernetes stops a pod with SIGTERM: a clean stop (exit 130, no native stack dump)
    that --resume continues. On Ray workers, as a RayJob runs."""
    out = tmp_path / "termed"
    over = tiny_overrides(rounds=4, **{"checkpoint.keep_last": 3, "clients.total": 4, "clients.per_round": 4,
                                       "runtime.num_workers": 1, "runtime.warm_start": "false"})
    cmd = [sys.executable, "-m", "raysim.cli", "run", "configs/quickstart.yaml", *over, "--quiet", "--out", str(out)]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = out / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and not (metrics.is_file() and sum(1 for _ in metrics.open()) >= 2):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == 130, err
    assert "interrupted; resume with --resume" in err and "Traceback" not in err and "SIGABRT" not in err
    assert len(metrics.read_text().splitlines()) < 5, "the run finished before the signal"
    assert _run(out, "--resume", "runtime.num_workers=1", "runtime.warm_start=false") == 0
    assert _records(out) == _records(full)
