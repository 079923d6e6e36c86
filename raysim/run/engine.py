"""The round loop: sample, broadcast, run clients, fold, evaluate, checkpoint, log.
It runs in the Driver actor (Ray) or in the CLI's process (local mode); the code is
the same, only the pool of client executors differs."""
from __future__ import annotations

import functools
import json
import math
import os
import threading
import time
from collections import Counter

from actors.pool import LocalPool, RayPool, WorkerGroup
from actors.protocol import DataPartition, FinalOutputs, RunSummary, load_state_tensors, state_tensors
from actors.worker import ClientWorker, peak_rss_mb
from raysim import algorithms, capabilities
from raysim.config import ExperimentConfig
from raysim.guard import Guarded
from raysim.guard.screening import Quarantine, reject_kind
from raysim.run import groups as worker_groups
from raysim.run.checkpoint import load_latest, save_checkpoint
from raysim.run.run_dir import RunDir
from raysim.run.seeding import derive_seed, sample_clients
from raysim.run.storage import remove_tree


class Engine:
    def __init__(self, cfg: ExperimentConfig, run_dir: str, resume: bool | str, staging: str | None = None):
        """`cfg`: the validated config (it travels typed, to a Driver actor too); `run_dir`: a
        path or a filesystem URL (`staging`: where a URL's run is worked on); `resume`: True,
        False, or "auto" (resume if `run_dir` holds a run)."""
        self.t_start = time.perf_counter()
        if cfg.clients.total == "auto":  # the CLI resolves it before Ray starts; direct callers here
            from raysim.data import prepare

            cfg, _ = prepare(cfg)
        self.cfg = cfg
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
            if "record" in meta and (not self.history or self.history[-1]["round"] < self.round):
                self.run.append(meta["record"])  # killed after the checkpoint, before its record
                self.history.append(meta["record"])
        state_root = self.run.client_state
        if not resume:
            remove_tree(state_root)
        self.pool = _build_pool(cfg, self.guarded, self.groups, client_group, state_root)
        # Actor creation above returns at once; build the driver's state while the workers
        # start and load their models, then wait for them. First the data's partition (the
        # CLI has checked the data before Ray started), recorded in partition.json.
        self.partition = self.algorithm.partition_record() if isinstance(self.algorithm, DataPartition) else None
        if self.partition is not None:
            (self.run.path / "partition.json").write_text(json.dumps(self.partition))
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
        """One round, step by step: sample, broadcast, run the clients, fold, record,
        evaluate, checkpoint."""
        r = self.round + 1
        t0 = time.perf_counter()
        client_ids, keep = self._sample(r)
        msg = self._broadcast(r, client_ids)
        out = self._run_clients(r, msg, client_ids, keep)
        t_fold = time.perf_counter()
        outcome = self.guarded.finalize(self.state, out.acc, r, msg, out.accepted, out.late, self.pool.client_call)
        self.state = outcome.state
        aggregate_s = out.merge_s + time.perf_counter() - t_fold
        record = self._record(r, client_ids, out, outcome)
        t_eval = time.perf_counter()
        if r % self.cfg.eval.every == 0 or r == self.cfg.rounds:
            record.update(self.algorithm.evaluate(self.state))
        eval_s = time.perf_counter() - t_eval
        record.update(self._placement(out))
        record.update(
            requeued=out.requeued,
            worker_failures=out.worker_failures,
            compute_s=out.compute_s,
            transfer_s=out.transfer_s,
            aggregate_s=aggregate_s,
            eval_s=eval_s,
        )
        t_ckpt = time.perf_counter()
        checkpointed = self._checkpoint(r, {**record, "wall_s": t_ckpt - t0})
        record.update(checkpoint_s=time.perf_counter() - t_ckpt, wall_s=time.perf_counter() - t0)
        self.round = r
        self.run.append(record)
        self.history.append(record)
        if checkpointed:  # a URL run directory: the checkpoint and this round's metrics
            self.sync_s += self.run.sync()
        return record

    def _broadcast(self, r: int, client_ids: list[int]):
        # the guard adds what its mode needs (SecAgg's key exchange with this round's clients)
        return self.guarded.prepare(self.algorithm.broadcast(self.state, r, client_ids), client_ids, self.pool.client_call)

    def _run_clients(self, r: int, msg, client_ids: list[int], keep: int):
        rt = self.cfg.runtime
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
        return out

    def _record(self, r: int, client_ids: list[int], out, outcome) -> dict:
        """What the round did: its clients, bytes, rejections, the fold's and clients' metrics."""
        record = {
            "round": r,
            "clients": out.accepted,
            "num_examples": out.num_examples,
            "bytes_up": out.bytes_up,
            "bytes_down": out.bytes_down,
        }
        if len(client_ids) != len(out.accepted) or self.cfg.runtime.round_deadline_s:
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
        return record

    def _checkpoint(self, r: int, record: dict) -> bool:
        """The round's record goes into the checkpoint too: a run killed between the two
        gets it back on resume (metrics.jsonl is appended after the checkpoint)."""
        cfg = self.cfg
        if not (r % cfg.checkpoint.every == 0 or r == cfg.rounds):
            return False
        meta = {
            "seed": cfg.seed,
            "client_versions": {str(c): v for c, v in sorted(self.versions.items())},
            "quarantine": self.quarantine.to_dict(),
            "record": record,
        }
        save_checkpoint(self.run.path, r, state_tensors(self.algorithm, self.state), meta, cfg.checkpoint.keep_last)
        return True

    def _placement(self, out) -> dict:
        """Which remote workers served the round (0: the driver) and which clients each ran."""
        if not self.cfg.runtime.num_workers:
            return {}
        served_by: dict[str, list[int]] = {}
        for c, w in sorted(out.served.items()):  # worker label "<group>-<k>", or "driver"
            served_by.setdefault("driver" if w < 0 else self.pool.labels[w], []).append(c)
        return {"workers": out.workers, "served_by": dict(sorted(served_by.items()))}

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
        if self.partition is not None and "skipped_bad_images" in self.partition:
            summary["skipped_bad_images"] = self.partition["skipped_bad_images"]  # data.skip_bad_images
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
        from raysim.run.report import write_curves

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
    skipped: e.g. a client with no batch this round), in name order. Summed in client-id
    order: float addition is not associative, and the order partials arrive in must not show."""
    values: dict[str, list[float]] = {}
    for _, metrics in sorted(client_metrics.items()):
        for name, v in metrics.items():
            if isinstance(v, (int, float)) and not math.isnan(v):
                values.setdefault(name, []).append(float(v))
    return {name: sum(vs) / len(vs) for name, vs in sorted(values.items())}


def _warm_start(rt, groups, secure_aggregation: bool = False) -> bool:
    """runtime.warm_start, with None resolved: on when the driver has a core to spare. Never
    under secure aggregation: a client trained in the driver's process shows the driver its
    plain update (asking for both is a config error)."""
    if rt.placement != "pooled" or secure_aggregation:
        return False
    if rt.warm_start is not None:
        return rt.warm_start
    if rt.ray_address:  # a cluster: the workers have nodes of their own
        return True
    reserved = sum(g.num_workers * g.num_cpus for g in groups)
    return (os.cpu_count() or 1) > reserved


def _build_pool(cfg: ExperimentConfig, guarded, groups, client_group, state_root: str):
    """The workers that run the clients: in this process (runtime.num_workers 0), or Ray actors."""
    rt = cfg.runtime
    seed_fn = functools.partial(derive_seed, cfg.seed)
    budget = int(rt.state_memory_mb * 2**20) if rt.state_memory_mb else None
    # every checkpoint kept may be resumed from (the newest ones may be unreadable), so each
    # client keeps the state versions back to the oldest: a client trains at most once a round
    keep_versions = cfg.checkpoint.every * cfg.checkpoint.keep_last + 1
    if rt.num_workers == 0:
        return LocalPool(guarded, seed_fn, state_root, budget, keep_versions)
    inline = None
    if _warm_start(rt, groups, cfg.privacy.secure_aggregation):
        # The workers' thread count: the driver shares the cores with them while they start.
        inline = ClientWorker(guarded, -1, seed_fn, state_root, rt.torch_threads, budget, keep_versions)
    return RayPool(
        guarded,
        seed_fn,
        state_root,
        num_clients=cfg.clients.total,
        groups=[WorkerGroup(g.name, g.num_workers, g.num_cpus, g.num_gpus, g.resources) for g in groups],
        placement=rt.placement,
        assignment=rt.assignment,
        torch_threads=rt.torch_threads,
        state_memory_bytes=budget,
        max_restarts=rt.max_worker_restarts,
        keep_versions=keep_versions,
        inline=inline,
        start_wait_s=rt.start_wait_s,
        placement_strategy=rt.placement_strategy,
        client_group=client_group,
    )
