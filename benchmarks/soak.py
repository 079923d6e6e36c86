"""Soak: many rounds in one run, memory must stay flat (issue 9).

    .venv/bin/python benchmarks/soak.py                 # 200 rounds x 100 clients, tiny CLIP
    .venv/bin/python benchmarks/soak.py --rounds 40 --synthetic   # fast variant (the test)

Runs the engine on 2 Ray workers and samples the private memory (USS) of the whole process tree
(driver, workers, Ray) after every round. Prints one JSON line: wall time, memory after
warm-up and at the end, and the growth in percent (goal: under 5%).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time


def soak(rounds: int, clients: int, synthetic: bool, run_dir: str, warmup: int = 20) -> dict:
    import ray
    import psutil

    from raysim.config import load_config
    from raysim.engine import Engine
    from raysim.memory import tree_memory_mb

    overrides = [
        f"rounds={rounds}", f"clients.total={clients}", "clients.per_round=10", "runtime.num_workers=2",
        "eval.every=1000000", "checkpoint.keep_last=2",
    ]
    if synthetic:
        overrides += ["algorithm.name=synthetic", "algorithm.options.num_params=200000", "pretrain.enabled=false"]
    else:
        overrides += ["model.hidden_size=32", "model.intermediate_size=64", "model.projection_dim=32", "train.local_epochs=1"]
    cfg = load_config("configs/quickstart.yaml", overrides)
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    t0 = time.perf_counter()
    engine = Engine(cfg.to_dict(), run_dir, False)
    engine.start()
    me = psutil.Process()
    series = []
    while not engine.done():
        engine.run_round()
        series.append(tree_memory_mb(me, "uss"))
    wall = time.perf_counter() - t0
    engine.finish()
    warm = series[min(warmup, len(series) - 1)]
    end = sum(series[-5:]) / len(series[-5:])
    return {
        "rounds": rounds,
        "clients": clients,
        "model": "synthetic" if synthetic else "tiny_clip",
        "wall_s": wall,
        "memory_after_warmup_mb": warm,
        "memory_end_mb": end,
        "growth_pct": 100 * (end - warm) / warm,
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--synthetic", action="store_true")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(soak(a.rounds, a.clients, a.synthetic, d + "/run")))
