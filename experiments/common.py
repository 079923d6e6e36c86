"""What every experiment shares: running a config with overrides through the engine in
local mode (here, or several runs at a time in worker processes), reading a finished run
directory back, and rewriting the experiment's own section of docs/results.md.

Local mode (`runtime.num_workers=0`): one process, no Ray, the same algorithm code and
the same numbers as with Ray workers.
"""
from __future__ import annotations

import json
import shutil
import tempfile
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any, Callable, Hashable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "docs" / "results.md"
LOCAL = "runtime.num_workers=0"


@dataclass
class Run:
    history: list[dict]  # one record per round, round 0 first (metrics.jsonl)
    seconds: float  # the engine's wall time, set-up included (summary.json `wall_s`)
    probed: Any = None  # what the job's `probe(engine)` returned after the last round


@dataclass(frozen=True)
class Job:
    """`out`: the run directory (None: a temporary one); `probe(engine)`: reads what the
    records do not hold (the final state, the algorithm's own tallies) before the engine goes;
    it must be a module-level function to reach a worker process."""

    config: Path
    overrides: tuple[str, ...]
    out: Path | None = None
    probe: Callable | None = None


def load(config: Path, overrides: list[str] | tuple[str, ...]):
    from raysim.config import load_config

    return load_config(config, [LOCAL, *overrides])


def run(job: Job) -> Run:
    """The job's config and overrides in local mode, to the last round. A given `out` is
    replaced: it holds this experiment's own output from an earlier invocation."""
    from raysim.run.engine import Engine

    cfg = load(job.config, job.overrides)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) if job.out is None else job.out
        shutil.rmtree(out, ignore_errors=True)
        engine = Engine(cfg, str(out), resume=False)
        engine.start()
        while not engine.done():
            engine.run_round()
        summary = engine.finish()
        return Run(engine.history, summary["wall_s"], job.probe(engine) if job.probe else None)


def _run_alone(job: Job) -> Run:
    import torch

    torch.set_num_threads(1)  # the runs at a time share the cores one each
    return run(job)


def run_all(jobs: dict[Hashable, Job], at_once: int = 2, show: Callable[[Run], Any] | None = None) -> dict:
    """Every job, `at_once` at a time in spawned processes of one torch thread each; prints
    each run's time (and `show(run)`) as it ends. Returns {key: Run} in the jobs' order."""
    runs = {}
    with ProcessPoolExecutor(max_workers=at_once, mp_context=get_context("spawn")) as pool:
        futures = {key: pool.submit(_run_alone, job) for key, job in jobs.items()}
        for key, future in futures.items():
            runs[key] = future.result()
            print(key, f"{runs[key].seconds:.0f}s", show(runs[key]) if show else "", flush=True)
    return runs


def finished(job: Job) -> Run:
    """The run an earlier invocation left in `job.out`, checked to be this job's config."""
    out = job.out
    if not (out / "summary.json").is_file():
        raise SystemExit(f"{out} holds no finished run (no summary.json); run the experiment without the report-only flag")
    saved = load(out / "config.yaml", []).to_dict()
    differ = _differences(saved, load(job.config, job.overrides).to_dict())
    if differ:
        raise SystemExit(f"{out} holds a run with other settings ({', '.join(differ)}); "
                         "run the experiment without the report-only flag")
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return Run(history, json.loads((out / "summary.json").read_text())["wall_s"])


def _differences(a: dict, b: dict, prefix: str = "") -> list[str]:
    """`key=saved value` for every leaf where `a` and `b` differ."""
    out = []
    for k in sorted(set(a) | set(b)):
        x, y = a.get(k), b.get(k)
        if isinstance(x, dict) and isinstance(y, dict):
            out += _differences(x, y, f"{prefix}{k}.")
        elif x != y:
            out.append(f"{prefix}{k}={x!r}")
    return out


def write_section(name: str, text: str, results: Path | None = None) -> None:
    """Put `text` between `<!-- BEGIN name -->` and `<!-- END name -->` in docs/results.md
    (appended if the markers are missing). Only that section changes: the rest of the file
    belongs to the other experiments. Read, modify and write at once, so a concurrent writer
    of another section loses nothing unless it writes in the same instant."""
    results = RESULTS if results is None else results
    begin, end = f"<!-- BEGIN {name} -->", f"<!-- END {name} -->"
    section = begin + "\n" + text.strip("\n") + "\n" + end
    old = results.read_text() if results.is_file() else "# Results\n"
    if begin in old and end in old:
        head, rest = old.split(begin, 1)
        new = head + section + rest.split(end, 1)[1]
    else:
        new = old.rstrip("\n") + "\n\n" + section + "\n"
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(new)


def tail_mean(history: list[dict], key: str, last: int) -> float:
    """Mean of `key` over the last `last` evaluated rounds (round 0, the starting model, excluded)."""
    values = [h[key] for h in history if key in h and h["round"] > 0][-last:]
    return sum(values) / len(values)


def final(history: list[dict], key: str) -> float:
    """`key` at the last round that recorded it."""
    return [h[key] for h in history if key in h][-1]
