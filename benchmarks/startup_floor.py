"""The start-up floor of any run on fresh Ray workers: Ray's start, two actors (1 CPU each)
importing what a client of the quickstart needs (torch, transformers' CLIPModel, peft),
and Ray's shutdown; no model, no data, no rounds. Measured like the benchmark's "after
imports": each run a fresh process that has imported the same libraries first.

    .venv/bin/python benchmarks/startup_floor.py [--runs 3]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

PHASES = ("ray_init_s", "workers_ready_s", "ray_shutdown_s", "total_s")


def one_run() -> dict:
    import peft  # noqa: F401  (the driver's imports, outside the timing as in the benchmark)
    import ray
    import torch  # noqa: F401
    from transformers import CLIPModel  # noqa: F401

    @ray.remote(num_cpus=1)
    class Worker:
        def __init__(self):
            import peft  # noqa: F401
            import torch  # noqa: F401
            from transformers import CLIPModel  # noqa: F401

        def ready(self) -> int:
            return os.getpid()

    os.environ.setdefault("RAY_worker_niceness", "0")  # as `raysim run` sets it
    t0 = time.perf_counter()
    ray.init(address="local", num_cpus=os.cpu_count(), include_dashboard=False, logging_level="ERROR")
    t1 = time.perf_counter()
    workers = [Worker.remote() for _ in range(2)]
    ray.get([w.ready.remote() for w in workers])
    t2 = time.perf_counter()
    ray.shutdown()
    t3 = time.perf_counter()
    return dict(zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t3 - t0)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(one_run()))
        return 0
    runs = []
    for i in range(args.runs):
        proc = subprocess.run([sys.executable, __file__, "--one"], capture_output=True, text=True, check=True)
        runs.append(json.loads(proc.stdout.strip().splitlines()[-1]))
        print(f"run {i + 1}: " + ", ".join(f"{k} {v:.2f}" for k, v in runs[-1].items()), flush=True)
    print("median: " + ", ".join(f"{k} {statistics.median(r[k] for r in runs):.2f}" for k in PHASES))
    return 0


if __name__ == "__main__":
    sys.exit(main())
