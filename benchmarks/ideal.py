"""The "ideal": a plain single-process PyTorch loop doing exactly the client updates of
raysim's FedAvg, with nothing around them (no Ray, no actors, no disk).

Same model (the cached pre-trained base, LoRA through the algorithm's `build_resident`,
built ONCE and also used for evaluation), same data and partition, same client sampling
(`sample_clients`), same per-client seeds (`derive_seed`), same steps (the algorithm's
own `client_step` on the one LoRA path, raysim/lora/, with each client's state kept
across rounds in a dict), same aggregation (its fold `zero`/`accumulate`/`finalize`:
raysim's fixed-point weighted sum, so the global adapter is bit-identical to raysim's).
Evaluation: round 0 and the last round, plus every `eval.every` rounds, exactly the
cadence of raysim's engine.

    .venv/bin/python benchmarks/ideal.py configs/quickstart.yaml clients.total=100 \
        rounds=20 eval.every=1000 --threads 2 --json /tmp/ideal.json

Any algorithm on the LoRA path runs this way (fedavg, fedprox, fedlarge with
configs/fedlarge.yaml: the MiniLM dual encoder).

Prints one JSON object (also written to --json): per-round wall times, the time spent
importing, the wall time after imports, peak memory (PSS of this process) and the final
adapter's L2 norm.
"""
from __future__ import annotations

import time

T_PROCESS = time.perf_counter()  # as close to interpreter start as Python code gets

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from raysim import algorithms  # noqa: E402
from raysim.config import load_config  # noqa: E402
from raysim.lora.adapters import l2_norm  # noqa: E402
from raysim.run.memory import PeakMemorySampler  # noqa: E402
from raysim.run.seeding import derive_seed, sample_clients  # noqa: E402

T_IMPORTED = time.perf_counter()


def path_loop(cfg):
    """The algorithm's own client step and fold, the resident model built once."""
    from actors.protocol import ClientContext

    algo = algorithms.load(cfg.algorithm.name)(cfg)
    resident = algo.build_resident()  # base model built once, LoRA added once
    algo.__dict__["_eval_resident"] = resident  # evaluate on the same model: one copy in the process
    client_state: dict[int, dict] = {}  # each client's optimizer moments / personal adapter

    def train_round(state, r: int, ids: list[int]):
        msg = algo.broadcast(state, r, ids)
        acc, losses = algo.zero(msg), []
        for cid in ids:
            ctx = ClientContext(cid, r, derive_seed(cfg.seed, r, cid), None, resident, client_state.setdefault(cid, {}))
            result = algo.client_step(ctx, msg)
            acc = algo.accumulate(acc, result)
            losses.append(result.metrics["train_loss"])
        return algo.finalize(state, acc), losses

    return algo.init_server(), train_round, algo.evaluate


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("config")
    ap.add_argument("overrides", nargs="*")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (the whole CPU budget)")
    ap.add_argument("--json", help="also write the result here")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", category=UserWarning)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    with PeakMemorySampler() as memory:
        cfg = load_config(args.config, args.overrides)
        state, train_round, evaluate = path_loop(cfg)
        t_eval = time.perf_counter()
        evals = {0: evaluate(state)}
        eval_s = {0: time.perf_counter() - t_eval}
        setup_s = t_eval - t0
        rounds = []
        for r in range(1, cfg.rounds + 1):
            t_r = time.perf_counter()
            ids = sample_clients(cfg.seed, r, cfg.clients.total, cfg.clients.per_round)
            state, losses = train_round(state, r, ids)
            losses = [x for x in losses if x == x]  # NaN: a client too small for one batch
            t_c = time.perf_counter()
            rec = {"round": r, "clients": ids, "compute_s": t_c - t_r}
            if r % cfg.eval.every == 0 or r == cfg.rounds:
                evals[r] = evaluate(state)
                rec["eval_s"] = time.perf_counter() - t_c
            rec["train_loss"] = sum(losses) / len(losses) if losses else float("nan")
            rec["wall_s"] = time.perf_counter() - t_r
            rounds.append(rec)
    result = {
        "side": "ideal",
        "threads": args.threads,
        "config": args.config,
        "overrides": args.overrides,
        "imports_s": T_IMPORTED - T_PROCESS,
        "setup_s": setup_s,
        "after_imports_s": time.perf_counter() - t0,
        "rounds": rounds,
        "eval0_s": eval_s[0],
        "initial": evals[0],
        "final": evals[max(evals)],
        "adapter_norm": l2_norm(state),
        "peak_memory_mb": memory.peak_mb,
        "pid": os.getpid(),
    }
    text = json.dumps(result)
    if args.json:
        Path(args.json).write_text(text)
    print(text)
    return result


if __name__ == "__main__":
    main()
