"""`raysim submit` / `raysim jobs` against a real Ray head started by this module.

The head runs in its own process group with its own temp dir, ports and auth token, all
on 127.0.0.1, so it never meets the in-process cluster (`ray.init(num_cpus=2)`) that
other tests use; teardown ends only the processes it started. Jobs reach it through the
RAY_ADDRESS that Ray gives every job, which is what the entrypoint relies on."""
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml

from conftest import tiny_overrides

ROOT = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
CACHE = os.environ["RAYSIM_CACHE"]  # set by conftest: the job reuses the suite's pre-trained base
TINY = tiny_overrides(**{"runtime.num_workers": 1, "runtime.warm_start": "false"})  # the worker actor serves every round


@dataclass
class Head:
    url: str
    client_env: dict
    temp_dir: str


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:  # hold them all open so the n ports differ
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _base_env() -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}  # nothing of the in-process cluster
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"  # the job's `python` is this venv's
    env["RAYSIM_CACHE"] = CACHE
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def _wait_for_dashboard(url: str, proc: subprocess.Popen, log: Path, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"ray start exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url + "/api/version", timeout=2)
            return
        except urllib.error.HTTPError:  # 401 without a token: the server is up
            return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"the Ray dashboard did not come up at {url} within {timeout_s}s:\n{log.read_text()[-3000:]}")


def _stop_head(proc: subprocess.Popen, temp_dir: str) -> None:
    """End the head's process group, then any straggler whose command line names our
    temp dir (raylet children), and nothing else: `ray stop` would kill every Ray."""
    for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            break
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in arg for arg in p.info["cmdline"] or []):
                p.kill()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass


@pytest.fixture(scope="module")
def ray_head():
    # Short and under /tmp: Ray's unix socket paths inside it must stay under 108 bytes.
    temp_dir = tempfile.mkdtemp(prefix="rsj-", dir="/tmp")
    gcs, dash, client, agent, agent_grpc, metrics, runtime_env, node_mgr, obj_mgr = _free_ports(9)
    token = secrets.token_hex(32)
    head_env = dict(_base_env(), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=token)
    cmd = [
        str(VENV_BIN / "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1", "--include-dashboard=true",
        f"--port={gcs}", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
        f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
        f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
        "--num-cpus=2", f"--temp-dir={temp_dir}",
    ]  # fmt: skip
    log = Path(temp_dir) / "ray-start.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env=head_env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{dash}"
    try:
        _wait_for_dashboard(url, proc, log)
        # The client gets the token but not RAY_AUTH_MODE: raysim must switch to token mode itself.
        yield Head(url, dict(_base_env(), RAY_AUTH_TOKEN=token), temp_dir)
    finally:
        _stop_head(proc, temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def raysim_jobs(head: Head, *args: str, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "raysim.deploy.jobs", *args],
        cwd=ROOT, env=head.client_env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def wait_status(head: Head, job_id: str, wanted: str, timeout_s: float = 120) -> str:
    deadline = time.monotonic() + timeout_s
    out = ""
    while time.monotonic() < deadline:
        out = raysim_jobs(head, "jobs", "status", job_id, "--address", head.url).stdout
        if wanted in out:
            return out
        time.sleep(1)
    pytest.fail(f"job {job_id} never reached {wanted}; last status: {out!r}")


@pytest.fixture(scope="module")
def failing_submit(ray_head, tmp_path_factory):
    """A waited-for submission of an impossible config, started before the good run so
    the two share the head's time (this module would otherwise take ~20 s longer)."""
    out = tmp_path_factory.mktemp("bad") / "run"
    proc = subprocess.Popen(
        [sys.executable, "-m", "raysim.deploy.jobs", "submit", "configs/quickstart.yaml", "clients.total=0",
         "--address", ray_head.url, "--out", str(out), "--submission-id", "raysim-test-bad"],
        cwd=ROOT, env=ray_head.client_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    yield proc, out
    if proc.poll() is None:
        proc.kill()


def test_submitted_run_succeeds_and_writes_its_run_directory(ray_head, failing_submit, tmp_path):
    out = tmp_path / "run"
    proc = raysim_jobs(
        ray_head, "submit", "configs/quickstart.yaml", *TINY, "--address", ray_head.url, "--out", str(out),
        "--env", f"RAYSIM_CACHE={CACHE}", "--submission-id", "raysim-test-ok",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "submitted job raysim-test-ok" in proc.stdout
    assert "round   2/2" in proc.stdout  # the followed logs
    assert "job raysim-test-ok SUCCEEDED" in proc.stdout

    rounds = [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 1, 2]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == 2 and summary["algorithm"] == "fedavg"
    runtime = yaml.safe_load((out / "config.yaml").read_text())["runtime"]
    assert runtime["ray_address"] == "auto" and runtime["num_workers"] == 1  # joined the head, 1 worker actor
    assert len(summary["peak_rss_mb_by_process"]["workers"]) == 1

    status = raysim_jobs(ray_head, "jobs", "status", "raysim-test-ok", "--address", ray_head.url)
    assert status.returncode == 0 and status.stdout.startswith("raysim-test-ok: SUCCEEDED")


def test_bad_config_job_fails_with_the_config_error_in_its_logs(ray_head, failing_submit):
    proc, out = failing_submit
    stdout, stderr = proc.communicate(timeout=240)
    assert proc.returncode == 1, stdout[-2000:] + stderr[-2000:]
    assert "job raysim-test-bad FAILED, exit code 2" in stderr
    assert "clients.total: Input should be greater than or equal to 1, or 'auto' (got 0)" in stdout  # followed logs

    logs = raysim_jobs(ray_head, "jobs", "logs", "raysim-test-bad", "--address", ray_head.url)
    assert logs.returncode == 0
    assert "raysim: error: invalid config configs/quickstart.yaml:" in logs.stdout
    assert "clients.total: Input should be greater than or equal to 1, or 'auto' (got 0)" in logs.stdout
    assert "Traceback" not in logs.stdout
    assert not out.exists()  # rejected before anything was written

    status = raysim_jobs(ray_head, "jobs", "status", "raysim-test-bad", "--address", ray_head.url)
    assert status.stdout.startswith("raysim-test-bad: FAILED")
    listing = raysim_jobs(ray_head, "jobs", "list", "--address", ray_head.url)
    assert "raysim-test-bad  FAILED" in listing.stdout
    stop = raysim_jobs(ray_head, "jobs", "stop", "raysim-test-bad", "--address", ray_head.url)
    assert stop.returncode == 0 and "already finished" in stop.stdout


def test_stopping_a_running_job_ends_its_submit_with_exit_code_1(ray_head, tmp_path):
    submit = subprocess.Popen(
        [sys.executable, "-m", "raysim.deploy.jobs", "submit", "configs/quickstart.yaml", *TINY, "rounds=50",
         "--address", ray_head.url, "--out", str(tmp_path / "run"), "--submission-id", "raysim-test-stop"],
        cwd=ROOT, env=ray_head.client_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_status(ray_head, "raysim-test-stop", "RUNNING")
        stop = raysim_jobs(ray_head, "jobs", "stop", "raysim-test-stop", "--address", ray_head.url)
        assert stop.returncode == 0 and "stop requested" in stop.stdout
        _, stderr = submit.communicate(timeout=120)
    finally:
        submit.kill()
    assert submit.returncode == 1 and "job raysim-test-stop STOPPED" in stderr
    wait_status(ray_head, "raysim-test-stop", "STOPPED", timeout_s=10)


def test_unknown_job_and_bad_input_exit_2_with_a_clear_message(ray_head, tmp_path):
    proc = raysim_jobs(ray_head, "jobs", "status", "no-such-job", "--address", ray_head.url)
    assert proc.returncode == 2 and "no job 'no-such-job' on this cluster" in proc.stderr

    (closed,) = _free_ports(1)
    proc = raysim_jobs(ray_head, "jobs", "list", "--address", f"http://127.0.0.1:{closed}")
    assert proc.returncode == 2 and f"cannot reach the Ray dashboard at http://127.0.0.1:{closed}" in proc.stderr

    proc = raysim_jobs(ray_head, "jobs", "list", "--address", "ray://127.0.0.1:10001")
    assert proc.returncode == 2 and "is not a Ray dashboard URL" in proc.stderr

    proc = raysim_jobs(ray_head, "submit", "configs/quickstart.yaml", "--address", ray_head.url, "--out", "runs/x")
    assert proc.returncode == 2 and "must be an absolute path on the cluster" in proc.stderr

    outside = tmp_path / "exp.yaml"
    outside.write_text("rounds: 1\n")
    proc = raysim_jobs(ray_head, "submit", str(outside), "--address", ray_head.url, "--out", str(tmp_path / "r"))
    assert proc.returncode == 2 and "is outside the project" in proc.stderr

    proc = raysim_jobs(
        ray_head, "submit", "configs/quickstart.yaml", "--env", "NOEQUALS", "--address", ray_head.url, "--out", "/tmp/x"
    )
    assert proc.returncode == 2 and "--env 'NOEQUALS' is not of the form KEY=VALUE" in proc.stderr
    for p in (proc.stderr, proc.stdout):
        assert "Traceback" not in p


def test_submit_out_is_an_absolute_path_or_a_url():
    from raysim.deploy.jobs import JobsError, _check_out

    _check_out("/storage/runs/x")
    _check_out("s3://bucket/runs/x")
    with pytest.raises(JobsError, match="absolute path on the cluster"):
        _check_out("runs/x")
