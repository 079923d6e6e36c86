"""Soak: many rounds in one run, memory must stay flat (issue 9).

    .venv/bin/python benchmarks/soak.py                 # 200 rounds x 100 clients, tiny CLIP
    .venv/bin/python benchmarks/soak.py --rounds 40 --synthetic   # fast variant (the test)

Runs the engine on 2 Ray workers and samples the memory of the whole process tree (driver,
workers, Ray) after every round: USS (private pages; ``growth_pct``) and RSS (``rss_*``; counts
shared pages once per process). Prints one JSON line: wall time, memory after warm-up and at
the end (mean of the last 5 rounds), the growth in percent (goal: under 5%) and the USS growth
per process. ``--series PATH`` also writes the per-round samples as JSON lines.

Warm-up is ``--warmup`` rounds counted from the round in which every worker is serving
(``workers_ready_round``): until then the driver serves the clients itself (pooled placement's
warm start) while the workers import torch and build their models, and on a loaded machine that
takes minutes (measured: 110 s, 45 rounds, at load average 9-17), which is start-up, not a leak.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time


def _per_process(root, kind: str) -> dict[int, tuple[str, float]]:
    """pid -> (name, MB) for the tree (Ray retitles workers: ray::ClientWorker, ray::IDLE, ...)."""
    import psutil

    out = {}
    for proc in [root, *root.children(recursive=True)]:
        try:
            out[proc.pid] = (proc.name(), getattr(proc.memory_full_info(), kind) / 2**20)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return out


def soak(
    rounds: int,
    clients: int,
    synthetic: bool,
    run_dir: str,
    warmup: int = 20,
    series_path: str | None = None,
    extra: list[str] = (),
) -> dict:
    import ray
    import psutil

    from raysim.config import load_config
    from raysim.run.engine import Engine
    from raysim.run.memory import tree_memory_mb

    overrides = [
        f"rounds={rounds}", f"clients.total={clients}", "clients.per_round=10", "runtime.num_workers=2",
        "eval.every=1000000", "checkpoint.keep_last=2",
    ]
    if synthetic:
        overrides += ["algorithm.name=synthetic", "algorithm.options.num_params=200000", "pretrain.enabled=false"]
    else:
        overrides += ["model.hidden_size=32", "model.intermediate_size=64", "model.projection_dim=32", "train.local_epochs=1"]
    cfg = load_config("configs/quickstart.yaml", [*overrides, *extra])
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="ERROR")
    t0 = time.perf_counter()
    engine = Engine(cfg, run_dir, False)
    engine.start()
    me = psutil.Process()
    series, rss, procs_warm, stores_warm = [], [], {}, []
    ready_round = None  # first round served with every worker up
    ref = None  # index of the reference sample
    n_workers = cfg.runtime.num_workers
    sink = open(series_path, "w") if series_path else None
    while not engine.done():
        engine.run_round()
        series.append(tree_memory_mb(me, "uss"))
        rss.append(tree_memory_mb(me, "rss"))
        if ready_round is None and len(getattr(engine.pool, "ready", ())) >= n_workers:
            ready_round = len(series)
        if ref is None and ready_round is not None and len(series) == ready_round + warmup:
            ref = len(series) - 1
            procs_warm = _per_process(me, "uss")
            stores_warm = engine.pool.store_stats()
        if sink:
            line = {"round": len(series), "uss_mb": series[-1], "rss_mb": rss[-1], "t_s": time.perf_counter() - t0}
            line["workers_ready"] = len(getattr(engine.pool, "ready", ()))  # before: the driver serves clients inline
            line["uss_by_process_mb"] = {f"{n} {pid}": round(mb, 1) for pid, (n, mb) in _per_process(me, "uss").items()}
            sink.write(json.dumps(line) + "\n")
            sink.flush()
    wall = time.perf_counter() - t0
    procs_end = _per_process(me, "uss")
    stores_end = engine.pool.store_stats()
    engine.finish()
    if sink:
        sink.close()
    if ref is None or ref > len(series) - 6:
        raise RuntimeError(
            f"too few rounds to measure: workers serving from round {ready_round}, warm-up {warmup}, {rounds} rounds"
        )
    i = ref
    warm, end = series[i], sum(series[-5:]) / len(series[-5:])
    rss_warm, rss_end = rss[i], sum(rss[-5:]) / len(rss[-5:])
    return {
        "rounds": rounds,
        "clients": clients,
        "model": "synthetic" if synthetic else "tiny_clip",
        "wall_s": wall,
        "workers_ready_round": ready_round,
        "reference_round": i + 1,
        "memory_after_warmup_mb": warm,
        "memory_end_mb": end,
        "growth_pct": 100 * (end - warm) / warm,
        "rss_after_warmup_mb": rss_warm,
        "rss_end_mb": rss_end,
        "rss_growth_pct": 100 * (rss_end - rss_warm) / rss_warm,
        # per worker: client states held in memory (adapter + optimizer moments; the copies on disk stay)
        "client_states_in_memory": {"after_warmup": stores_warm, "end": stores_end},
        "uss_growth_by_process_mb": {  # a process started after warm-up counts from 0
            f"{name} {pid}": round(mb - procs_warm.get(pid, ("", 0.0))[1], 1) for pid, (name, mb) in sorted(procs_end.items())
        },
    }


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=200)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--synthetic", action="store_true")
    ap.add_argument("--warmup", type=int, default=20, help="rounds after every worker is serving, before the reference sample")
    ap.add_argument("--series", help="write per-round memory samples (JSON lines) here")
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="extra config override")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        print(json.dumps(soak(a.rounds, a.clients, a.synthetic, d + "/run", a.warmup, a.series, a.set)))
