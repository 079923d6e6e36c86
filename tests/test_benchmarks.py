"""The benchmark command runs end to end on a tiny setting (benchmarks are not timed
tests: this only checks that `benchmarks/run.py --quick` works and writes its JSON)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
FLOWER_PY = ROOT / "benchmarks" / ".flower-venv" / "bin" / "python"
METRICS = ("steady_round_s", "mean_round_s", "first_round_s", "after_imports_s", "process_wall_s", "peak_memory_mb")


def _quick(tmp_path: Path, *extra: str) -> dict:
    out = tmp_path / "results.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "run.py"), "--quick", "--json", str(out), *extra],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(out.read_text())


def _check(res: dict, sides: list[str]) -> None:
    run = res["quick_run"]
    assert run["pairs"] == 1
    for side in sides:
        med = run["median"][side]
        for key in METRICS:
            assert med[key] > 0, (side, key, med[key])
        assert len(run["runs"][side]) == 1
        assert len(run["runs"][side][0]["round_wall_s"]) == 2  # 2 rounds
        assert run["adapter_norm"][side] > 0
    # the same client updates on every side: equal final adapters
    assert run["adapter_norm_max_rel_diff"] < 1e-4


def test_quick_benchmark_raysim_and_ideal(tmp_path):
    res = _quick(tmp_path)
    assert res["quick"] is True
    assert set(res["quick_run"]["median"]) == {"raysim", "ideal"}
    _check(res, ["raysim", "ideal"])


@pytest.mark.skipif(
    not FLOWER_PY.exists(),
    reason="Flower's own venv benchmarks/.flower-venv is absent (create it with: bash benchmarks/setup_flower.sh)",
)
def test_quick_benchmark_flower(tmp_path):
    res = _quick(tmp_path, "--sides", "flower")
    assert set(res["quick_run"]["median"]) == {"flower"}
    _check(res, ["flower"])
