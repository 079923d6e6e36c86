"""The pool follows the cluster: workers join when their node appears, leave when it goes."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.timeout(900)
def test_pool_follows_nodes_added_and_removed(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "scripts" / "autoscale_pool.py"), str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=850,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = json.loads(proc.stdout.strip().splitlines()[-1])
    workers = log["workers"]
    assert workers[0] == 1  # only one worker fits the head node
    assert workers[1:3] == [2, 2]  # the added node's worker serves from the next round
    # after the node is removed: its worker's clients re-run on the other one, then one worker serves
    assert sum(log["failures"][3:]) >= 1 or workers[3] == 1
    assert workers[-1] == 1
    assert log["identical"], f"final adapter differs from local mode by {log['max_abs_diff']}"
