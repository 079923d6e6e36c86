"""Warm start on or off (`runtime.warm_start`), raysim against the ideal loop, on workloads
(a) 100 clients / 10 per round / 20 rounds and (b) the same with 5 rounds, sides run
alternately (warm, cold, ideal, warm, cold, ideal, ...), medians over the pairs.

    .venv/bin/python benchmarks/warm_start.py [--pairs 2]

Stores its numbers in benchmarks/extra_results.json ("warm_start"), which
benchmarks/bench_report.py renders into docs/benchmarks.md.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import run as bench  # noqa: E402  (benchmarks/run.py: the same runners as the main benchmark)

WORKLOADS = {
    "a": ["clients.total=100", "clients.per_round=10", "rounds=20"],
    "b": ["clients.total=100", "clients.per_round=10", "rounds=5"],
}
METRICS = ("steady_round_s", "after_imports_s", "process_wall_s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pairs", type=int, default=2)
    args = ap.parse_args()
    scratch = Path(tempfile.mkdtemp(prefix="raysim-warm-"))
    bench.IDEAL_THREADS[0] = 2
    out = {"command": "benchmarks/warm_start.py", "measured": time.strftime("%Y-%m-%d %H:%M"),
           "load_avg_at_start": os.getloadavg()[0], "workloads": {}}
    for name, ov in WORKLOADS.items():
        pre = name != "a"  # as in run.py: (a) times the CLI without pre-imports
        runs = {"warm": [], "cold": [], "ideal": []}
        for i in range(args.pairs):
            runs["warm"].append(bench.run_raysim(ov + ["runtime.warm_start=true"], scratch, f"{name}w{i}", preimport=pre))
            runs["cold"].append(bench.run_raysim(ov + ["runtime.warm_start=false"], scratch, f"{name}c{i}", preimport=pre))
            runs["ideal"].append(bench.run_ideal(ov, scratch, f"{name}i{i}"))
        res = {}
        for side, rs in runs.items():
            res[side] = {m: statistics.median(r[m] for r in rs) for m in METRICS}
            if side != "ideal":
                res[side]["first_worker_round"] = [
                    min(bench._brief(r)["rounds_served_by_workers"], default=None) for r in rs
                ]
            print(name, side, res[side], flush=True)
        out["workloads"][name] = {"overrides": ov, **res}
    out["load_avg_at_end"] = os.getloadavg()[0]
    path = HERE / "extra_results.json"
    extra = json.loads(path.read_text()) if path.is_file() else {}
    extra["warm_start"] = out
    path.write_text(json.dumps(extra, indent=1))
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
