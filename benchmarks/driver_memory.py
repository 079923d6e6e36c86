"""Driver memory while aggregating many large updates: workers pre-reduce their clients'
updates, the driver merges partials in place, so its peak should stay a small multiple
of ONE update however many clients there are.

    .venv/bin/python benchmarks/driver_memory.py --clients 1000 --params 10000000 --tensors 128

An update is `--tensors` tensors (an adapter: LoRA A and B of 2 modules x 32 layers = 128).

Prints a JSON line: driver peak RSS growth during the round, in units of one update.
"""
from __future__ import annotations

import argparse
import json
import threading
import time

import psutil


def measure(clients: int, params: int, workers: int, run_dir: str, tensors: int = 1) -> dict:
    import ray

    from raysim.config import load_config
    from raysim.run.engine import Engine

    overrides = [
        "algorithm.name=synthetic",
        f"algorithm.options.num_params={params}",
        f"algorithm.options.num_tensors={tensors}",
        "algorithm.options.state_params=0",
        f"clients.total={clients}",
        f"clients.per_round={clients}",
        "rounds=1",
        f"runtime.num_workers={workers}",
        "runtime.warm_start=false",  # the driver only aggregates here, it serves no client
        "pretrain.enabled=false",
    ]
    cfg = load_config("configs/quickstart.yaml", overrides)
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=workers, include_dashboard=False, logging_level="ERROR")
    engine = Engine(cfg, run_dir, False)
    engine.start()
    proc = psutil.Process()
    base = proc.memory_info().rss
    base_uss = proc.memory_full_info().uss
    peak, peak_uss = base, base_uss
    stop = threading.Event()

    def sample():
        nonlocal peak, peak_uss
        while not stop.is_set():
            # RSS also counts object-store pages the driver maps (shared, owned by Ray's
            # store); USS is the driver's own memory.
            info = proc.memory_full_info()
            peak, peak_uss = max(peak, info.rss), max(peak_uss, info.uss)
            time.sleep(0.01)

    # The aggregation phase: dispatch, collect and merge the partials, finalize.
    client_ids, _ = engine._sample(1)
    msg = engine.algorithm.broadcast(engine.state, 1, client_ids)
    t = threading.Thread(target=sample)
    t.start()
    t0 = time.perf_counter()
    out = engine.pool.run_round(msg, client_ids, {})
    new_state = engine.guarded.finalize(engine.state, out.acc, 1, msg, out.accepted, out.late, engine.pool.client_call).state
    stop.set()
    t.join()
    rec = {"clients": out.accepted}
    assert sum(t.numel() for t in new_state.values()) == params
    update_bytes = params * 4
    engine.pool.shutdown()
    return {
        "clients": clients,
        "params": params,
        "tensors": tensors,
        "workers": workers,
        "update_mb": update_bytes / 2**20,
        "driver_peak_rss_growth_mb": (peak - base) / 2**20,
        "rss_growth_in_updates": (peak - base) / update_bytes,
        "driver_peak_uss_growth_mb": (peak_uss - base_uss) / 2**20,
        "uss_growth_in_updates": (peak_uss - base_uss) / update_bytes,
        "round_s": time.perf_counter() - t0,
        "clients_folded": len(rec["clients"]),
    }


if __name__ == "__main__":
    import tempfile

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=1000)
    ap.add_argument("--params", type=int, default=10_000_000)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--tensors", type=int, default=128)
    ap.add_argument("--record", action="store_true", help="also store the result in benchmarks/extra_results.json (docs/benchmarks.md shows it)")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as d:
        result = measure(a.clients, a.params, a.workers, d + "/run", a.tensors)
    print(json.dumps(result))
    if a.record:
        from pathlib import Path

        path = Path(__file__).resolve().parent / "extra_results.json"
        extra = json.loads(path.read_text()) if path.is_file() else {}
        extra["driver_memory"] = {**result, "command": "benchmarks/driver_memory.py " + " ".join(__import__("sys").argv[1:]),
                                  "measured": time.strftime("%Y-%m-%d %H:%M"), "load_avg_1m": __import__("os").getloadavg()[0]}
        path.write_text(json.dumps(extra, indent=1))
