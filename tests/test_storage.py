"""Run directories on filesystem URLs (raysim/run/storage.py): fsspec's in-process memory://
and file:// stand in for s3:// / gs://. A run cut off after round 2 and continued with
--auto-resume from an empty staging directory (a fresh pod) ends bit-identical to an
uninterrupted run; checkpoints appear at the URL only whole; bad URLs exit 2."""
import importlib.util
import json
import shutil
import uuid

import fsspec
import pytest
import torch
from fsspec.implementations.memory import MemoryFileSystem
from fsspec.registry import _registry as fsspec_registry
from safetensors.torch import load, load_file

from actors.state_store import ClientStateStore
from conftest import tiny_overrides
from raysim.cli import main
from raysim.run.storage import Mirror

MEM = fsspec.filesystem("memory")


def run(out, *extra, **over):
    over = {"checkpoint.keep_last": 2, **over}
    return main(["run", "configs/quickstart.yaml", *tiny_overrides(**over), "--out", str(out), "--quiet", *extra])


def lines(text: str) -> list[dict]:
    # every key but the time breakdown (wall_s, compute_s, ...), which differs run to run
    return [{k: v for k, v in json.loads(x).items() if not k.endswith("_s")} for x in text.splitlines()]


@pytest.fixture
def mem_url():
    root = f"/raysim-test-{uuid.uuid4().hex[:8]}"
    yield f"memory://{root}"
    if MEM.exists(root):
        MEM.rm(root, recursive=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The reference: 3 rounds in one go, on a local path."""
    out = tmp_path_factory.mktemp("full") / "run"
    assert run(out, rounds=3) == 0
    return out


def test_url_run_resumed_on_a_fresh_staging_dir_is_bit_identical(tmp_path, mem_url, uninterrupted):
    root = mem_url.removeprefix("memory://")
    # attempt 1: starts (nothing at the URL yet) and stops after round 2
    assert run(mem_url, "--auto-resume", "--staging", str(tmp_path / "A"), rounds=2) == 0
    assert MEM.exists(f"{root}/config.yaml") and MEM.find(f"{root}/client_state")  # written by the workers
    # attempt 2 on "another pod": an empty staging directory, everything comes from the URL
    fresh = tmp_path / "B"
    assert run(mem_url, "--auto-resume", "--staging", str(fresh), rounds=3) == 0
    assert lines(MEM.cat_file(f"{root}/metrics.jsonl").decode()) == lines((uninterrupted / "metrics.jsonl").read_text())
    assert [r["round"] for r in lines(MEM.cat_file(f"{root}/metrics.jsonl").decode())] == [0, 1, 2, 3]
    for rel in ("adapter/adapter_model.safetensors", "checkpoints/round-00003/server.safetensors"):
        got, want = load(MEM.cat_file(f"{root}/{rel}")), load_file(str(uninterrupted / rel))
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), rel
    summary = json.loads(MEM.cat_file(f"{root}/summary.json"))
    assert summary["final"] == json.loads((uninterrupted / "summary.json").read_text())["final"]
    # keep_last=2: round 1 was pruned locally, and so at the URL too
    ckpts = sorted({p.split("/")[-2] for p in MEM.find(f"{root}/checkpoints")})
    assert ckpts == ["round-00002", "round-00003"]
    # the staging directory mirrors the URL (client state stays remote only)
    assert not (fresh / "client_state").exists() and (fresh / "summary.json").is_file()


def test_ray_workers_write_client_state_at_a_file_url(tmp_path, ray_cluster, uninterrupted):
    """Workers in other processes write client state at the URL; a local-mode run resumes
    from it on another staging directory and reaches the uninterrupted run's round 3."""
    url = f"file://{tmp_path / 'remote'}"
    over = {"rounds": 2, "runtime.num_workers": 1, "runtime.warm_start": "false"}
    assert run(url, "--staging", str(tmp_path / "A"), **over) == 0
    recs = lines((tmp_path / "remote" / "metrics.jsonl").read_text())
    assert all(r["workers"] >= 1 for r in recs[1:])  # a Ray worker served the rounds
    states = sorted((tmp_path / "remote" / "client_state").rglob("r*.safetensors"))
    assert len(states) == 6  # 3 clients a round, 2 rounds
    assert run(url, "--auto-resume", "--staging", str(tmp_path / "B"), rounds=3) == 0
    got = load_file(str(tmp_path / "remote" / "checkpoints" / "round-00003" / "server.safetensors"))
    want = load_file(str(uninterrupted / "checkpoints" / "round-00003" / "server.safetensors"))
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-3, atol=1e-4)  # thread counts differ


class _Recording(MemoryFileSystem):
    """A memory filesystem of its own that records uploads and deletions in order."""

    protocol = "recmem"
    store: dict = {}
    pseudo_dirs = [""]
    log: list = []

    @classmethod
    def _strip_protocol(cls, path):
        return super()._strip_protocol(path.replace("recmem://", "memory://", 1))

    def put_file(self, lpath, rpath, **kw):
        self.log.append(("put", rpath.split("/run/", 1)[1]))
        return super().put_file(lpath, rpath, **kw)

    def rm_file(self, path):
        self.log.append(("rm", path.split("/run/", 1)[1]))
        return super().rm_file(path)


def test_mirror_uploads_a_checkpoint_before_its_meta_and_deletes_meta_first(tmp_path, monkeypatch):
    monkeypatch.setitem(fsspec_registry, "recmem", _Recording)
    m = Mirror("recmem://bucket/run", tmp_path / "stage")
    m.prepare_staging()
    stage, log = m.staging, _Recording.log
    log.clear()

    def ckpt(r):
        d = stage / "checkpoints" / f"round-{r:05d}"
        d.mkdir(parents=True)
        (d / "server.safetensors").write_bytes(b"t" * r)
        (d / "meta.json").write_text("{}")

    ckpt(1)
    (stage / "metrics.jsonl").write_text("{}\n")
    (stage / "checkpoints" / ".tmp-round-00002").mkdir()  # half-written locally: never uploaded
    assert m.sync() == {"uploaded": 3, "deleted": 0}  # the marker and .tmp-round-* are skipped
    order = [p for _, p in log]
    assert order.index("checkpoints/round-00001/server.safetensors") < order.index("checkpoints/round-00001/meta.json")
    assert order[-1] == "checkpoints/round-00001/meta.json"
    assert not any(".tmp" in p or ".raysim" in p for p in order)

    log.clear()
    assert m.sync() == {"uploaded": 0, "deleted": 0}  # nothing changed, nothing sent
    assert log == []

    ckpt(2)
    shutil.rmtree(stage / "checkpoints" / "round-00001")  # pruned
    with open(stage / "metrics.jsonl", "a") as f:
        f.write("{}\n")
    m.sync()
    assert log == [
        ("put", "checkpoints/round-00002/server.safetensors"),
        ("put", "metrics.jsonl"),
        ("put", "checkpoints/round-00002/meta.json"),
        ("rm", "checkpoints/round-00001/meta.json"),
        ("rm", "checkpoints/round-00001/server.safetensors"),
    ]

    # an upload cut short at the URL (data without meta.json) is not a checkpoint: a fresh
    # pod does not download it, and its next sync removes it
    fs = _Recording()
    fs.pipe_file("/bucket/run/checkpoints/round-00003/server.safetensors", b"partial")
    fresh = Mirror("recmem://bucket/run", tmp_path / "fresh")
    fresh.prepare_staging()
    got = fresh.download()
    assert "checkpoints/round-00002/meta.json" in got
    assert not any("round-00003" in p for p in got) and not (fresh.staging / "checkpoints" / "round-00003").exists()
    fresh.sync()
    assert not fs.exists("/bucket/run/checkpoints/round-00003/server.safetensors")
    assert fs.exists("/bucket/run/checkpoints/round-00002/meta.json")
    _Recording.store.clear()


def test_staging_dir_of_something_else_is_refused(tmp_path):
    other = tmp_path / "stage"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="not the staging directory of memory://x/run"):
        Mirror("memory://x/run", other).prepare_staging()
    assert (other / "notes.txt").read_text() == "mine"


def test_client_state_store_on_a_url_round_trips_and_prunes(mem_url):
    store = ClientStateStore(f"{mem_url}/client_state", memory_budget_bytes=1, keep_versions=2)
    states = {r: {"adapter": {"w": torch.randn(3, 4)}, "opt": {"m": torch.full((2,), float(r))}} for r in (1, 3, 5)}
    for base, (r, s) in zip((0, 1, 3), states.items()):  # each round from the one before
        store.put(7, r, s, base=base)
    store.put(8, 5, {}, base=0)  # evicts client 7 from memory (budget of 1 byte)
    assert store.versions(7) == [3, 5]  # pruned to keep_versions
    back = store.get(7, 5)
    assert store.loads_from_disk == 1
    assert all(torch.equal(back[g][k], states[5][g][k]) for g in states[5] for k in states[5][g])
    again = ClientStateStore(f"{mem_url}/client_state")  # another worker, another node
    assert torch.equal(again.get(7, 3)["opt"]["m"], states[3]["opt"]["m"]) and again.get(8, 5) == {}
    with pytest.raises(FileNotFoundError, match="client 7 from round 1 is missing"):
        again.get(7, 1)


def test_bad_urls_exit_2_with_one_clear_message(tmp_path, mem_url, capsys, monkeypatch):
    assert run("nosuchfs://bucket/run") == 2
    err = capsys.readouterr().err
    assert "nosuchfs://bucket/run" in err and "no filesystem implements nosuchfs://" in err and "Traceback" not in err

    if importlib.util.find_spec("s3fs") is None:  # CI: the storage extra is not installed
        assert run("s3://bucket/run") == 2
        assert "pip install 'raysim[storage]'" in capsys.readouterr().err

    class NoCredentialsError(Exception):
        """What botocore raises without credentials."""

    class NoCreds(MemoryFileSystem):
        protocol = "s3"

        def find(self, *a, **k):
            raise NoCredentialsError("Unable to locate credentials")

    with monkeypatch.context() as m:  # s3fs stand-in, as if installed but without credentials
        m.setitem(fsspec_registry, "s3", NoCreds)
        assert run("s3://bucket/run") == 2
    err = capsys.readouterr().err
    assert "s3://bucket/run" in err and "Unable to locate credentials" in err and "AWS_ACCESS_KEY_ID" in err

    # a URL that holds something else: refused, nothing changed
    MEM.pipe_file(f"{mem_url.removeprefix('memory://')}/precious.txt", b"keep")
    assert run(mem_url, "--staging", str(tmp_path / "s")) == 2
    assert "is not empty" in capsys.readouterr().err
    assert MEM.cat_file(f"{mem_url.removeprefix('memory://')}/precious.txt") == b"keep"
    # memory:// cannot reach Ray workers
    assert run(mem_url + "/x", "--staging", str(tmp_path / "t"), **{"runtime.num_workers": 1}) == 2
    assert "memory:// lives in one process" in capsys.readouterr().err


def test_auto_resume_on_a_local_path_and_a_changed_config(tmp_path, capsys):
    from raysim.config import load_config
    from raysim.run.run_dir import RunDir

    cfg = load_config("configs/quickstart.yaml", tiny_overrides())
    d = RunDir(tmp_path / "run")
    assert d.prepare(cfg, "auto") is False  # nothing there: a new run
    assert RunDir(tmp_path / "run").prepare(cfg, "auto") is True  # config.yaml there: resume
    other = load_config("configs/quickstart.yaml", tiny_overrides(seed=5))
    with pytest.raises(Exception, match=r"different config: seed \(0 in the run directory, 5 now\)"):
        RunDir(tmp_path / "run").prepare(other, "auto")
    assert run(tmp_path / "run", "--auto-resume", seed=5) == 2
    assert "different config" in capsys.readouterr().err


def test_a_key_that_escapes_the_staging_directory_is_refused(tmp_path, mem_url, capsys):
    """Anyone who can write under the URL's prefix must not get a file write elsewhere."""
    stage = tmp_path / "stage"
    assert run(mem_url, "--staging", str(stage), rounds=1) == 0
    root = mem_url.removeprefix("memory://")
    MEM.pipe_file(f"{root}/checkpoints/../../../../escaped.txt", b"owned")
    assert run(mem_url, "--staging", str(tmp_path / "fresh"), "--resume", rounds=2) == 2
    err = capsys.readouterr().err
    assert "would be written outside the staging directory" in err and "Traceback" not in err
    assert not any(p.name == "escaped.txt" for p in tmp_path.rglob("*"))
    assert not (tmp_path / "fresh" / "metrics.jsonl").exists()  # nothing was downloaded
    # the run itself is untouched: removing the key lets it resume
    MEM.rm_file(f"{root}/checkpoints/../../../../escaped.txt")
    assert run(mem_url, "--staging", str(tmp_path / "fresh2"), "--resume", rounds=2) == 0
