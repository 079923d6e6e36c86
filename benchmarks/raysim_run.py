"""`raysim run` with timestamps: the real CLI (`raysim.cli.main`), preceded by the same
imports the CLI makes, so the time spent importing and the wall time after imports can
be told apart. Everything else (Ray start, the Driver actor, the workers, the summary
with peak_memory_mb) is the CLI's own.

    .venv/bin/python benchmarks/raysim_run.py --json /tmp/r.json -- run configs/quickstart.yaml \
        --out /tmp/run clients.total=100 --quiet
"""
from __future__ import annotations

import time

T_PROCESS = time.perf_counter()

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# What `raysim run` imports on its way (cli -> ray, torch via the engine, transformers, peft).
import ray  # noqa: E402,F401
import torch  # noqa: E402,F401
import peft  # noqa: E402,F401
import transformers  # noqa: E402,F401

import actors.driver  # noqa: E402,F401
import raysim.engine  # noqa: E402,F401
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
    if ray.is_initialized():
        ray.shutdown()  # inside the timing: Flower's run_simulation also shuts its Ray down
    result = {"side": "raysim", "imports_s": T_IMPORTED - T_PROCESS, "after_imports_s": time.perf_counter() - t0, "exit": code}
    if out_json:
        Path(out_json).write_text(json.dumps(result))
    return code


if __name__ == "__main__":
    sys.exit(main())
