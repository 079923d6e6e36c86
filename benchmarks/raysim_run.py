"""`raysim run` with timestamps: the real CLI (`raysim.cli.main`), preceded by the imports
the run needs, so the time spent importing and the wall time after imports can be told
apart (the definition Flower's side uses: its script imports torch and flwr first).
With `RAYSIM_BENCH_PREIMPORT=0` nothing heavy is imported first, so the CLI imports torch
in a thread while Ray starts, as `raysim run` does: the whole-process time of that run is
what a user waits for. Everything else (Ray start, the workers, the summary with
peak_memory_mb) is the CLI's own.

    .venv/bin/python benchmarks/raysim_run.py --json /tmp/r.json -- run configs/quickstart.yaml \
        --out /tmp/run clients.total=100 --quiet
"""
from __future__ import annotations

import os
import time

T_PROCESS = time.perf_counter()

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PREIMPORT = os.environ.get("RAYSIM_BENCH_PREIMPORT", "1") != "0"
if PREIMPORT:
    # What `raysim run` imports on its way (ray, torch, transformers, peft, the engine).
    import peft  # noqa: E402,F401
    import ray  # noqa: E402,F401
    import torch  # noqa: E402,F401
    import transformers  # noqa: E402,F401

    import raysim.run.engine  # noqa: E402,F401
from raysim import cli  # noqa: E402

T_IMPORTED = time.perf_counter()


def main() -> int:
    argv = sys.argv[1:]
    out_json = None
    if argv[:1] == ["--json"]:
        out_json, argv = argv[1], argv[2:]
    if argv[:1] == ["--"]:
        argv = argv[1:]
    t0 = time.perf_counter()
    code = cli.main(argv)
    import ray

    if ray.is_initialized():
        ray.shutdown()  # inside the timing: Flower's run_simulation also shuts its Ray down
    result = {
        "side": "raysim",
        "preimport": PREIMPORT,
        "imports_s": T_IMPORTED - T_PROCESS,
        "after_imports_s": time.perf_counter() - t0,
        "exit": code,
    }
    if out_json:
        Path(out_json).write_text(json.dumps(result))
    return code


if __name__ == "__main__":
    cli.exit_without_teardown(main())  # as the `raysim` command ends
