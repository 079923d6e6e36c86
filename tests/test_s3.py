"""An s3:// run directory against a real S3 API: moto's server on 127.0.0.1, reached by s3fs
through the standard AWS_ENDPOINT_URL variable (botocore reads it; raysim passes nothing
S3-specific). A 2-round local-mode run writes its run directory into the bucket; an
--auto-resume from an empty staging directory continues it to round 3 and ends with the
uninterrupted run's result."""
import json
import socket

import pytest
import s3fs
import torch
from moto.server import ThreadedMotoServer
from safetensors.torch import load, load_file

from conftest import tiny_overrides
from raysim.cli import main

BUCKET = "raysim-runs"


def run(out, *extra, **over):
    over = {"checkpoint.keep_last": 2, **over}
    return main(["run", "configs/quickstart.yaml", *tiny_overrides(**over), "--out", str(out), "--quiet", *extra])


@pytest.fixture
def s3(monkeypatch):
    """A moto S3 server on a free port with one empty bucket; the s3fs filesystem on it."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    for key, value in {
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }.items():
        monkeypatch.setenv(key, value)
    s3fs.S3FileSystem.clear_instance_cache()  # instances are cached by arguments, not by environment
    fs = s3fs.S3FileSystem()
    fs.mkdir(BUCKET)
    try:
        yield fs
    finally:
        s3fs.S3FileSystem.clear_instance_cache()
        server.stop()


def records(text: str) -> list[dict]:
    return [{k: v for k, v in json.loads(x).items() if not k.endswith("_s")} for x in text.splitlines()]


def test_s3_run_directory_written_then_auto_resumed_from_a_fresh_staging_dir(tmp_path, s3):
    url = f"s3://{BUCKET}/runs/quick"
    assert run(url, "--staging", str(tmp_path / "A"), rounds=2) == 0
    root = f"{BUCKET}/runs/quick"
    files = {p.removeprefix(root + "/") for p in s3.find(root)}
    for rel in ("config.yaml", "metrics.jsonl", "summary.json", "curves.png", "adapter/adapter_model.safetensors",
                "checkpoints/round-00001/meta.json", "checkpoints/round-00002/meta.json",
                "checkpoints/round-00002/server.safetensors"):  # fmt: skip
        assert rel in files, rel
    assert any(f.startswith("client_state/") for f in files)  # written straight to the bucket
    assert [r["round"] for r in records(s3.cat_file(f"{root}/metrics.jsonl").decode())] == [0, 1, 2]

    # another pod: nothing staged; --auto-resume finds the run in the bucket and continues it
    fresh = tmp_path / "B"
    assert run(url, "--auto-resume", "--staging", str(fresh), rounds=3) == 0
    full = tmp_path / "full"
    assert run(full, rounds=3) == 0
    got = records(s3.cat_file(f"{root}/metrics.jsonl").decode())
    assert [r["round"] for r in got] == [0, 1, 2, 3]
    assert got == records((full / "metrics.jsonl").read_text())
    for rel in ("checkpoints/round-00003/server.safetensors", "adapter/adapter_model.safetensors"):
        a, b = load(s3.cat_file(f"{root}/{rel}")), load_file(str(full / rel))
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in b), rel
    # keep_last=2: round 1 was pruned in the bucket too
    s3.invalidate_cache()
    assert sorted({p.split("/")[-2] for p in s3.find(f"{root}/checkpoints")}) == ["round-00002", "round-00003"]
    assert json.loads(s3.cat_file(f"{root}/summary.json"))["rounds"] == 3
