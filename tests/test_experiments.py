"""experiments/common.py: the run helper and the section writer every experiment uses."""
import sys
from operator import attrgetter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from experiments.common import Job, finished, run, run_all, write_section  # noqa: E402

QUICKSTART = ROOT / "configs" / "quickstart.yaml"
# No model: seeded random updates, evaluated by the norm of the global state.
SYNTHETIC = ("algorithm.name=synthetic", "algorithm.options.num_params=50", "algorithm.options.state_params=0",
             "rounds=2", "clients.total=6", "clients.per_round=3")


def test_write_section_replaces_only_its_own(tmp_path):
    results = tmp_path / "results.md"
    results.write_text("# Results\n\n<!-- BEGIN a -->\nold a\n<!-- END a -->\n\nnote on a\n\n"
                       "<!-- BEGIN b -->\nold b\n<!-- END b -->\n")
    write_section("a", "\nnew a\nsecond line\n", results)
    assert results.read_text() == ("# Results\n\n<!-- BEGIN a -->\nnew a\nsecond line\n<!-- END a -->\n\nnote on a\n\n"
                                   "<!-- BEGIN b -->\nold b\n<!-- END b -->\n")
    write_section("c", "c", results)  # no markers yet: appended
    assert results.read_text().endswith("<!-- END b -->\n\n<!-- BEGIN c -->\nc\n<!-- END c -->\n")
    write_section("d", "d", tmp_path / "new" / "results.md")
    assert (tmp_path / "new" / "results.md").read_text() == "# Results\n\n<!-- BEGIN d -->\nd\n<!-- END d -->\n"


def test_a_finished_run_reads_back_and_other_settings_are_refused(tmp_path):
    job = Job(QUICKSTART, SYNTHETIC, tmp_path / "run")
    done = run(job)
    assert [h["round"] for h in done.history] == [0, 1, 2]
    assert done.history[0]["norm"] == 0.0 < done.history[2]["norm"]
    again = finished(job)
    assert [h["norm"] for h in again.history] == [h["norm"] for h in done.history]
    assert again.seconds == done.seconds
    with pytest.raises(SystemExit, match=r"rounds=2"):
        finished(Job(QUICKSTART, (*SYNTHETIC, "rounds=3"), tmp_path / "run"))
    with pytest.raises(SystemExit, match="no finished run"):
        finished(Job(QUICKSTART, SYNTHETIC, tmp_path / "elsewhere"))
    assert run(job).history[2]["norm"] == done.history[2]["norm"]  # the run directory is replaced, not resumed


def test_runs_in_worker_processes_equal_runs_here(tmp_path):
    here = {seed: run(Job(QUICKSTART, (*SYNTHETIC, f"seed={seed}"))) for seed in (0, 1)}
    jobs = {seed: Job(QUICKSTART, (*SYNTHETIC, f"seed={seed}"), tmp_path / str(seed), attrgetter("round")) for seed in (0, 1)}
    there = run_all(jobs, at_once=2)
    assert list(there) == [0, 1]
    for seed in (0, 1):
        assert [h["norm"] for h in there[seed].history] == [h["norm"] for h in here[seed].history]
        assert there[seed].probed == 2  # what the probe read from the engine after the last round
    assert here[0].history[2]["norm"] != here[1].history[2]["norm"]
