"""Bad input: one clear paragraph on stderr, exit code 2, no traceback, nothing lost."""
import json
import os
import subprocess
import sys
from pathlib import Path


from conftest import tiny_overrides
from raysim.cli import main

RAYSIM = [sys.executable, "-m", "raysim.cli"]
ROOT = Path(__file__).resolve().parents[1]


def cli(*args, cwd=ROOT):
    return subprocess.run([*RAYSIM, *args], capture_output=True, text=True, cwd=cwd, env=os.environ.copy(), timeout=300)


def assert_clean_error(proc, *needles):
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr and "Traceback" not in proc.stdout
    for n in needles:
        assert n in proc.stderr, (n, proc.stderr)


def test_malformed_yaml(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: 3\nclients: {total: 4\n")
    assert_clean_error(cli("run", str(bad)), str(bad), "not valid YAML", "line")


def test_unknown_and_impossible_values(tmp_path):
    proc = cli("run", "configs/quickstart.yaml", "clients.total=0", "data.alpha=0", "lora.rnak=3")
    assert_clean_error(proc, "configs/quickstart.yaml", "clients.total", "data.alpha", "lora.rnak", "unknown key")
    proc = cli("run", "configs/quickstart.yaml", "clients.per_round=80")
    assert_clean_error(proc, "clients.per_round (80) exceeds clients.total (50)")


def test_missing_config():
    assert_clean_error(cli("run", "configs/nope.yaml"), "configs/nope.yaml does not exist")


def test_nonempty_run_dir_is_not_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    proc = cli("run", "configs/quickstart.yaml", *tiny_overrides(), "--out", str(out))
    assert_clean_error(proc, "not empty", "--resume")
    assert (out / "precious.txt").read_text() == "keep me" and len(list(out.iterdir())) == 1


def test_resume_with_a_different_config_is_refused_and_corrupt_checkpoint_falls_back(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "configs/quickstart.yaml", *tiny_overrides(), "--out", str(out), "--quiet"]) == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}

    proc = cli("run", "configs/quickstart.yaml", *tiny_overrides(seed=5), "--out", str(out), "--resume")
    assert_clean_error(proc, "different config", "seed (0 in the run directory, 5 now)")
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before

    proc = cli("run", "configs/quickstart.yaml", *tiny_overrides(), "--out", str(tmp_path / "empty"), "--resume")
    assert_clean_error(proc, "holds no run")

    # truncate the newest checkpoint: resume warns, uses the previous one and redoes round 2
    newest = sorted((out / "checkpoints").iterdir())[-1]
    data = (newest / "server.safetensors").read_bytes()
    (newest / "server.safetensors").write_bytes(data[: len(data) // 2])
    assert main(["run", "configs/quickstart.yaml", *tiny_overrides(rounds=3), "--out", str(out), "--resume", "--quiet"]) == 0
    assert "corrupted" in capsys.readouterr().err
    rounds = [json.loads(line)["round"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert rounds == [0, 1, 2, 3]

    # every checkpoint broken: a clear error, exit 2
    for ck in (out / "checkpoints").iterdir():
        (ck / "meta.json").write_text("{")
    proc = cli("run", "configs/quickstart.yaml", *tiny_overrides(rounds=4), "--out", str(out), "--resume")
    assert_clean_error(proc, "no usable checkpoint")


def test_help_lists_commands():
    proc = cli("--help")
    assert proc.returncode == 0 and "run" in proc.stdout and "pretrain" in proc.stdout


def test_the_command_runs_exit_handlers_and_flushes_before_skipping_teardown(tmp_path):
    marker = tmp_path / "atexit.txt"
    code = (
        "import atexit, sys\n"
        "from raysim.cli import exit_without_teardown\n"
        f"atexit.register(lambda: open({str(marker)!r}, 'w').write('ran'))\n"
        "print('buffered', end='')\n"
        "sys.stderr.write('err')\n"
        "exit_without_teardown(3)\n"
        "print('not reached')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (proc.returncode, proc.stdout, proc.stderr) == (3, "buffered", "err")
    assert marker.read_text() == "ran"


def test_resources_no_node_has_are_refused_instead_of_waited_for(tmp_path):
    import pytest

    from raysim.cli import _check_feasible, _check_reachable
    from raysim.config import ConfigError, load_config

    laptop = [{"CPU": 2.0, "memory": 8e9}]

    def refused(*over):
        cfg = load_config("configs/quickstart.yaml", list(over))
        with pytest.raises(ConfigError) as err:
            _check_feasible(cfg, laptop)
        return str(err.value)

    assert "runtime.num_gpus_per_worker: each worker asks for GPU 0.5, but this machine has GPU 0" in refused(
        "runtime.num_gpus_per_worker=0.5")
    assert "runtime.num_cpus_per_worker: each worker asks for CPU 4, but this machine has CPU 2" in refused(
        "runtime.num_cpus_per_worker=4")
    group = "runtime.worker_groups=[{name: gpu, families: [default], num_gpus: 1, resources: {a100: 1}}]"
    text = refused(group)
    assert "runtime.worker_groups[0].num_gpus" in text and "runtime.worker_groups[0].resources.a100" in text
    _check_feasible(load_config("configs/quickstart.yaml"), laptop)  # the quickstart fits: no error
    _check_feasible(load_config("configs/quickstart.yaml", ["runtime.num_gpus_per_worker=0.5"]), [{"CPU": 8.0, "GPU": 1.0}])
    with pytest.raises(ConfigError, match=r"runtime.ray_address 127.0.0.1:1: nothing answers there"):
        _check_reachable("127.0.0.1:1")
    # end to end, in a fresh process (this one's Ray is already up): exit 2 within seconds, not a hang
    out = tmp_path / "gpu"
    proc = subprocess.run([*RAYSIM, "run", "configs/quickstart.yaml", "runtime.num_gpus_per_worker=0.5", "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "runtime.num_gpus_per_worker" in proc.stderr and "Traceback" not in proc.stderr


def test_bad_inputs_exit_2_with_one_message_and_nothing_lost(tmp_path, capsys):
    """Each row: the exact input, a part of the message, and nothing already there changed."""
    (tmp_path / "latin1.yaml").write_bytes("name: caf\xe9\n".encode("latin-1"))
    (tmp_path / "empty.yaml").write_text("")
    (tmp_path / "a-file").write_text("mine")
    q = "configs/quickstart.yaml"
    rows = [
        ([str(tmp_path / "latin1.yaml")], "is not UTF-8 text"),
        ([str(tmp_path / "empty.yaml")], "is empty; start from a config such as configs/quickstart.yaml"),
        ([str(tmp_path)], "is a directory; pass a YAML file"),
        ([q, "algorithm.name=json:loads"], "'json:loads' is not a class"),
        ([q, "algorithm.name=json:Missing"], "algorithm module json defines no Missing"),
        ([q, "algorithm.name=collections:OrderedDict"], "is not an algorithm: it lacks init_server"),
        ([q, "seed=-1"], "seed: Input should be greater than or equal to 0"),
        ([q, "robust.rule=multi_krum", "robust.num_byzantine=3", "clients.per_round=4"], "it can assume at most 1"),
        ([q, "name=../../etc"], "name: String should match pattern"),
        ([q, "--out", str(tmp_path / "a-file")], "is a file, not a directory"),
        ([q, "--out", str(tmp_path / "a-file" / "run")], "cannot write there"),
        ([q, "--out", ""], "--out is empty"),
        ([q, "--timeline", str(tmp_path / "nowhere" / "t.json"), "--out", str(tmp_path / "t")], "its directory does not exist"),
    ]
    for args, message in rows:
        cmd = ["run", *args[:1], *tiny_overrides(), *args[1:]]
        if "--out" not in args:
            cmd += ["--out", str(tmp_path / "never")]
        assert main(cmd) == 2, args
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, (args, err)
    assert (tmp_path / "a-file").read_text() == "mine"
    assert not (tmp_path / "never").exists() and not (tmp_path / "t").exists()


def test_resume_reads_around_a_damaged_metrics_file(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["run", "configs/quickstart.yaml", *tiny_overrides(rounds=2), "--out", str(out), "--quiet"]) == 0
    metrics = out / "metrics.jsonl"
    good = metrics.read_text()
    # a blank line and a last line cut short (the run killed writing it): resumed, records intact
    metrics.write_text(good + "\n" + good.splitlines()[-1][:20])
    assert main(["run", "configs/quickstart.yaml", *tiny_overrides(rounds=3), "--out", str(out), "--resume", "--quiet"]) == 0
    assert [json.loads(x)["round"] for x in metrics.read_text().splitlines()] == [0, 1, 2, 3]
    # a line that is not a record in the middle, or a byte that is not UTF-8: exit 2, file unchanged
    for damaged in (b'{"round": 0}\nnot json\n' + metrics.read_bytes(), metrics.read_bytes() + b"\xff\n"):
        metrics.write_bytes(damaged)
        assert main(["run", "configs/quickstart.yaml", *tiny_overrides(rounds=4), "--out", str(out), "--resume"]) == 2
        err = capsys.readouterr().err
        assert ("line 2 of" in err or "not UTF-8" in err) and "Traceback" not in err
        assert metrics.read_bytes() == damaged
    # a garbled config.yaml of the run: exit 2 naming it, nothing changed
    metrics.write_text(good)
    (out / "config.yaml").write_text("rounds: [unclosed\n")
    assert main(["run", "configs/quickstart.yaml", *tiny_overrides(rounds=4), "--out", str(out), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "the run's own" in err and "config.yaml cannot be read" in err and "Traceback" not in err
    assert (out / "config.yaml").read_text() == "rounds: [unclosed\n" and metrics.read_text() == good
