"""The round loop: sample, broadcast, run clients, fold, evaluate, checkpoint, log.
It runs in the Driver actor (Ray) or in the CLI's process (local mode); the code is
the same, only the pool of client executors differs."""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import threading
import time
from collections import Counter
from pathlib import Path

import yaml

from actors.pool import LocalPool, RayPool, WorkerGroup
from actors.worker import ClientWorker, peak_rss_mb
from raysim import algorithms
from raysim.checkpoint import load_latest, save_checkpoint
from raysim.config import ConfigError, ExperimentConfig, config_from_dict, save_config
from actors.protocol import FinalOutputs, RunSummary, load_state_tensors, state_tensors
from raysim import capabilities
from raysim import groups as worker_groups
from raysim.guard import Guarded
from raysim.guard.screening import Quarantine, reject_kind
from raysim.seeding import derive_seed, sample_clients
from raysim.storage import Mirror, is_url, remove_tree

# Keys that may differ between the original run and its --resume: more rounds, another
# runtime (e.g. resume on a different cluster), evaluation and checkpoint cadence.
_RESUMABLE_KEYS = {"rounds", "runtime", "eval", "checkpoint", "name"}


def _diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]} ({a!r} in the run directory, {b!r} now)"]


class RunDir:
    """The run directory: a local path, or a filesystem URL (raysim/storage.py) whose run
    is worked on in a local staging directory and mirrored to the URL by `sync`."""

    def __init__(self, out: str | Path, staging: str | Path | None = None):
        self.mirror = Mirror(str(out), staging) if is_url(out) else None
        self.path = self.mirror.staging if self.mirror else Path(out)
        self.location = self.mirror.url if self.mirror else str(self.path)  # for messages
        self.metrics = self.path / "metrics.jsonl"
        # Client state is written by the workers, wherever they run: at the URL itself.
        self.client_state = f"{self.mirror.url}/client_state" if self.mirror else str(self.path / "client_state")

    def prepare(self, cfg: ExperimentConfig, resume: bool | str) -> bool:
        """Check the directory against `resume` (True, False or "auto": resume if it holds a
        run) and write config.yaml; returns whether the run resumes."""
        p, m = self.path, self.mirror
        if m is not None:
            m.check(cfg.runtime.num_workers)
            holds = m.holds_run()
        else:
            holds = (p / "config.yaml").is_file()
        if resume == "auto":
            resume = holds
        if resume:
            if not holds:
                raise ConfigError(f"--resume: {self.location} holds no run (no config.yaml); drop --resume to start one there")
            if m is not None:
                m.prepare_staging()
                m.download()
            saved = p / "config.yaml"
            old = config_from_dict(yaml.safe_load(saved.read_text()), str(saved)).to_dict()
            new = cfg.to_dict()
            diffs = [d for k in sorted(set(old) - _RESUMABLE_KEYS) for d in _diff(old[k], new.get(k), k + ".")]
            if diffs:
                raise ConfigError(
                    f"--resume: the checkpoint directory {self.location} was made by a different config: "
                    + "; ".join(diffs)
                    + ". Resume with the original config, or start a new run with another --out."
                )
        else:
            if m is not None:
                nonempty = bool(m.remote_files())
            else:
                nonempty = p.exists() and any(p.iterdir())
            if nonempty:
                raise ConfigError(
                    f"run directory {self.location} is not empty; pass --resume to continue that run, or choose another --out "
                    "(nothing there was changed)"
                )
            if m is not None:
                m.prepare_staging()
        p.mkdir(parents=True, exist_ok=True)
        save_config(cfg, p / "config.yaml")
        self.sync()
        return bool(resume)

    def sync(self) -> float:
        """Mirror the staging directory to the URL (nothing for a local run); seconds taken."""
        if self.mirror is None:
            return 0.0
        t0 = time.perf_counter()
        self.mirror.sync()
        return time.perf_counter() - t0

    def truncate_metrics(self, last_round: int) -> list[dict]:
        """Keep the records of rounds <= last_round (a resumed run rewrites later ones)."""
        if not self.metrics.is_file():
            return []
        kept = [r for r in map(json.loads, self.metrics.read_text().splitlines()) if r["round"] <= last_round]
        self.metrics.write_text("".join(json.dumps(r) + "\n" for r in kept))
        return kept

    def append(self, record: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.metrics.read_text().splitlines()] if self.metrics.is_file() else []


class Engine:
    def __init__(self, cfg_dict: dict, run_dir: str, resume: bool | str, staging: str | None = None):
        """`run_dir`: a path or a filesystem URL (`staging`: where a URL's run is worked on);
        `resume`: True, False, or "auto" (resume if `run_dir` holds a run)."""
        self.t_start = time.perf_counter()
        self.cfg = cfg = config_from_dict(cfg_dict)
        self.algorithm = algorithms.load(cfg.algorithm.name)(cfg)
        capabilities.check(cfg, self.algorithm)  # an option it cannot honour fails before anything is written
        # Which worker group serves which client (a bad family fails before anything is written).
        self.groups, client_group = worker_groups.resolve(cfg, self.algorithm)
        self.run = RunDir(run_dir, staging)
        resume = self.run.prepare(cfg, resume)
        self.sync_s = 0.0
        self._closing: threading.Thread | None = None  # finish()'s curves and last upload
        self._closing_error: BaseException | None = None
        # What the workers run and the driver folds: screening, robust rules, DP, SecAgg.
        self.guarded = Guarded(self.algorithm, cfg, self.run.client_state)
        self.quarantine = Quarantine(cfg.robust.quarantine_strikes, cfg.robust.quarantine_rounds)
        ckpt = load_latest(self.run.path) if resume else None
        # versions[c]: the round that wrote client c's current state (absent: never trained)
        self.versions: dict[int, int] = {}
        if ckpt is None:
            self.round = 0
            self.state = None  # built below, while the workers start
            self.history = self.run.truncate_metrics(-1)
        else:
            self.round, tensors, meta = ckpt
            self.state = load_state_tensors(self.algorithm, tensors)
            self.versions = {int(c): v for c, v in meta.get("client_versions", {}).items()}
            if "quarantine" in meta:
                self.quarantine = Quarantine.from_dict(meta["quarantine"])
            self.history = self.run.truncate_metrics(self.round)
        seed_fn = functools.partial(derive_seed, cfg.seed)
        state_root = self.run.client_state
        if not resume:
            remove_tree(state_root)
        rt = cfg.runtime
        budget = int(rt.state_memory_mb * 2**20) if rt.state_memory_mb else None
        if rt.num_workers == 0:
            self.pool = LocalPool(self.guarded, seed_fn, state_root, budget, cfg.checkpoint.every + 1)
        else:
            inline = None
            if _warm_start(rt, self.groups):
                # The workers' thread count: the driver shares the cores with them while they start.
                inline = ClientWorker(self.guarded, -1, seed_fn, state_root, rt.torch_threads, budget, cfg.checkpoint.every + 1)
            self.pool = RayPool(
                self.guarded,
                seed_fn,
                state_root,
                num_clients=cfg.clients.total,
                groups=[WorkerGroup(g.name, g.num_workers, g.num_cpus, g.num_gpus, g.resources) for g in self.groups],
                placement=rt.placement,
                assignment=rt.assignment,
                torch_threads=rt.torch_threads,
                state_memory_bytes=budget,
                max_restarts=rt.max_worker_restarts,
                keep_versions=cfg.checkpoint.every + 1,
                inline=inline,
                start_wait_s=rt.start_wait_s,
                placement_strategy=rt.placement_strategy,
                client_group=client_group,
            )
        # Actor creation above returns at once; build the driver's state while the workers
        # start and load their models, then wait for them.
        if self.state is None:
            self.state = self.algorithm.init_server()
        self.pool.start()
        self.setup_s = time.perf_counter() - self.t_start

    # The CLI drives these one at a time so it can show progress between calls.
    def start(self) -> dict:
        """Evaluate the starting model (round 0) unless resuming; return the latest record."""
        if not self.history:
            t0 = time.perf_counter()
            metrics = self.algorithm.evaluate(self.state)
            record = {"round": 0, "wall_s": 0.0, "clients": [], "bytes_up": 0, "bytes_down": 0, **metrics}
            record["eval_s"] = time.perf_counter() - t0
            self.run.append(record)
            self.history.append(record)
        return {"round": self.round, "total_rounds": self.cfg.rounds, "last": self.history[-1]}

    def done(self) -> bool:
        return self.round >= self.cfg.rounds

    def _sample(self, r: int) -> tuple[list[int], int]:
        """This round's clients (quarantined ones excluded) and how many results to keep."""
        cfg, rt = self.cfg, self.cfg.runtime
        excluded = {int(c) for c in self.quarantine.quarantined(r)}
        available = cfg.clients.total - len(excluded)
        keep = min(cfg.clients.per_round, available)
        n = min(available, math.ceil(keep * (1 + rt.over_select)))
        return sample_clients(cfg.seed, r, cfg.clients.total, n, exclude=excluded), keep

    def run_round(self) -> dict:
        cfg, rt = self.cfg, self.cfg.runtime
        r = self.round + 1
        t0 = time.perf_counter()
        client_ids, keep = self._sample(r)
        msg = self.guarded.prepare(self.algorithm.broadcast(self.state, r, client_ids), client_ids, self.pool.client_call)
        versions = {c: self.versions[c] for c in client_ids if c in self.versions}
        out = self.pool.run_round(
            msg,
            client_ids,
            versions,
            keep=keep if len(client_ids) > keep else None,
            deadline_s=rt.round_deadline_s,
            min_results=rt.min_results,
        )
        for c in out.accepted:
            self.versions[c] = r
        t_agg = time.perf_counter()
        outcome = self.guarded.finalize(self.state, out.acc, r, msg, out.accepted, out.late, self.pool.client_call)
        self.state = outcome.state
        aggregate_s = out.merge_s + time.perf_counter() - t_agg
        record = {
            "round": r,
            "clients": out.accepted,
            "num_examples": out.num_examples,
            "bytes_up": out.bytes_up,
            "bytes_down": out.bytes_down,
        }
        if len(client_ids) != len(out.accepted) or rt.round_deadline_s:
            record["sampled"], record["late"] = client_ids, out.late
        if self.guarded.screens:
            rejected = outcome.rejected
            for c in out.accepted:
                self.quarantine.record(c, r, c not in rejected)
            record["rejected"] = dict(Counter(reject_kind(v) for v in rejected.values()))
            record["rejected_clients"] = sorted(rejected)
            record["quarantined"] = sorted(int(c) for c in self.quarantine.quarantined(r + 1))
        record.update(outcome.metrics)  # e.g. DP's epsilon, fedlarge's per-client contribution
        means = client_metric_means(out.client_metrics)
        if "train_loss" in means:
            record["train_loss"] = means["train_loss"]
        if means:  # every metric the clients report (e.g. fedlarge's kept_fraction), averaged
            record["client_means"] = means
        t_eval = time.perf_counter()
        if r % cfg.eval.every == 0 or r == cfg.rounds:
            record.update(self.algorithm.evaluate(self.state))
        eval_s = time.perf_counter() - t_eval
        t_ckpt = time.perf_counter()
        checkpointed = r % cfg.checkpoint.every == 0 or r == cfg.rounds
        if checkpointed:
            meta = {
                "seed": cfg.seed,
                "client_versions": {str(c): v for c, v in sorted(self.versions.items())},
                "quarantine": self.quarantine.to_dict(),
            }
            save_checkpoint(self.run.path, r, state_tensors(self.algorithm, self.state), meta, cfg.checkpoint.keep_last)
        checkpoint_s = time.perf_counter() - t_ckpt
        if rt.num_workers:
            record["workers"] = out.workers  # remote workers that served the round (0: the driver)
            # worker label ("<group>-<k>", "driver" for the driver's process) -> its clients
            served_by: dict[str, list[int]] = {}
            for c, w in sorted(out.served.items()):
                served_by.setdefault("driver" if w < 0 else self.pool.labels[w], []).append(c)
            record["served_by"] = dict(sorted(served_by.items()))
        record.update(
            requeued=out.requeued,
            worker_failures=out.worker_failures,
            compute_s=out.compute_s,
            transfer_s=out.transfer_s,
            aggregate_s=aggregate_s,
            eval_s=eval_s,
            checkpoint_s=checkpoint_s,
            wall_s=time.perf_counter() - t0,
        )
        self.round = r
        self.run.append(record)
        self.history.append(record)
        if checkpointed:  # a URL run directory: the checkpoint and this round's metrics
            self.sync_s += self.run.sync()
        return record

    def finish(self, cli_peak_rss_mb: float = 0.0, run_peak_pss_mb: float | None = None, wait: bool = True) -> dict:
        """`cli_peak_rss_mb`: the CLI process when it is not this one (Ray mode);
        `run_peak_pss_mb`: the CLI's sampler over every process of the run. With
        `wait=False` curves.png is drawn in a thread (matplotlib: ~1 s) while the caller
        shuts Ray down (~1 s of waiting for its processes), and `close()` joins it."""
        if isinstance(self.algorithm, FinalOutputs):
            self.algorithm.save_final(self.state, self.run.path)
        metric_keys = [k for k in self.history[0] if isinstance(self.history[0][k], float) and not k.endswith("_s")]
        evaluated = [h for h in self.history if all(k in h for k in metric_keys)]
        workers = self.pool.peak_rss_mb()
        driver = peak_rss_mb()
        summary = {
            "algorithm": self.cfg.algorithm.name,
            "rounds": self.round,
            "initial": {k: evaluated[0][k] for k in metric_keys},
            "final": {k: evaluated[-1][k] for k in metric_keys},
            "wall_s": time.perf_counter() - self.t_start,
            "setup_s": self.setup_s,
            "bytes_up": sum(h["bytes_up"] for h in self.history),
            "bytes_down": sum(h["bytes_down"] for h in self.history),
            # Sum of per-process peaks (counts shared pages in every process: an upper bound).
            "peak_rss_mb": driver + sum(workers) + cli_peak_rss_mb,
            "peak_rss_mb_by_process": {"driver": driver, "workers": workers, "cli": cli_peak_rss_mb},
            # Peak of the whole process tree at one moment, shared pages counted once.
            "peak_memory_mb": run_peak_pss_mb,
        }
        if self.run.mirror is not None:
            summary["storage_sync_s"] = self.sync_s  # uploads after each checkpoint (not the final one)
        if isinstance(self.algorithm, RunSummary):
            summary.update(self.algorithm.summary_extra(self.history))
        (self.run.path / "summary.json").write_text(json.dumps(summary, indent=1))
        self.pool.shutdown()
        self._closing = threading.Thread(target=self._draw_and_sync, name="raysim-curves")
        self._closing.start()
        if wait:
            self.close()
        return summary

    def _draw_and_sync(self) -> None:
        from raysim.report import write_curves

        try:
            write_curves(self.history, self.run.path / "curves.png")
            self.run.sync()  # a URL run directory: its last upload, curves included
        except BaseException as err:  # noqa: BLE001 - re-raised by close(), in the caller's thread
            self._closing_error = err

    def close(self) -> None:
        """Wait for finish()'s curves and last upload; re-raise what failed there."""
        if self._closing is not None:
            self._closing.join()
            self._closing = None
        err, self._closing_error = self._closing_error, None
        if err is not None:
            raise err


def client_metric_means(client_metrics: dict[int, dict[str, float]]) -> dict[str, float]:
    """Per metric name, the plain mean over the clients that reported it as a number (NaN
    skipped: e.g. a client with no batch this round), in name order."""
    values: dict[str, list[float]] = {}
    for metrics in client_metrics.values():
        for name, v in metrics.items():
            if isinstance(v, (int, float)) and not math.isnan(v):
                values.setdefault(name, []).append(float(v))
    return {name: sum(vs) / len(vs) for name, vs in sorted(values.items())}


def _warm_start(rt, groups) -> bool:
    """runtime.warm_start, with None resolved: on when the driver has a core to spare."""
    if rt.placement != "pooled":
        return False
    if rt.warm_start is not None:
        return rt.warm_start
    if rt.ray_address:  # a cluster: the workers have nodes of their own
        return True
    reserved = sum(g.num_workers * g.num_cpus for g in groups)
    return (os.cpu_count() or 1) > reserved

