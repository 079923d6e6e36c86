"""Executors that run one round's clients: in-process (local mode) or on a pool of
ClientWorker Ray actors. Both return the round's fold merged in worker order."""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

from actors.worker import ClientWorker, Partial


@dataclass
class RoundOutput:
    acc: Any
    client_metrics: dict[int, dict[str, float]]
    num_examples: int
    bytes_up: int
    bytes_down: int
    compute_s: float  # busiest worker's compute time
    wait_s: float  # driver time from dispatch to last partial, beyond the busiest worker's compute
    merge_s: float


def merge_partials(algorithm, msg, partials: list[Partial], dispatch_s: float = 0.0) -> RoundOutput:
    t0 = time.perf_counter()
    acc = algorithm.zero(msg)
    out = RoundOutput(acc, {}, 0, 0, 0, 0.0, 0.0, 0.0)
    for p in sorted(partials, key=lambda p: p.worker):  # canonical order: never timing-dependent
        out.acc = algorithm.merge(out.acc, p.acc)
        out.client_metrics.update(p.client_metrics)
        out.num_examples += p.num_examples
        out.bytes_up += p.bytes_up
        out.bytes_down += p.bytes_down
        out.compute_s = max(out.compute_s, p.compute_s)
    out.merge_s = time.perf_counter() - t0
    out.wait_s = max(0.0, dispatch_s - out.compute_s)
    return out


class LocalPool:
    """runtime.num_workers == 0: the same worker code, in this process, no Ray."""

    def __init__(self, algorithm, seed_fn, state_root, resume_round, torch_threads: int | None = None):
        import torch

        self.worker = ClientWorker(
            algorithm, 0, seed_fn, state_root, resume_round, torch_threads or torch.get_num_threads()
        )
        self.algorithm = algorithm

    def start(self) -> None:
        self.worker.ready()

    def run_round(self, msg, client_ids: list[int]) -> RoundOutput:
        t0 = time.perf_counter()
        part = self.worker.run(msg, client_ids)
        return merge_partials(self.algorithm, msg, [part], time.perf_counter() - t0)

    def peak_rss_mb(self) -> list[float]:
        return []

    def shutdown(self) -> None:
        pass


class RayPool:
    """A pool of ClientWorker actors. `pooled`: `num_workers` actors serve all clients,
    client c sticks to worker c % num_workers (its state stays there). `dedicated`: one
    actor per client, each with its own resources."""

    def __init__(
        self,
        algorithm,
        seed_fn: Callable[[int, int], int],
        state_root: str | None,
        resume_round: int | None,
        num_clients: int,
        num_workers: int,
        placement: str,
        num_cpus: float,
        num_gpus: float,
        torch_threads: int,
    ):
        import ray

        self.algorithm = algorithm
        self.placement = placement
        n = num_clients if placement == "dedicated" else num_workers
        remote = ray.remote(ClientWorker).options(num_cpus=num_cpus, num_gpus=num_gpus, max_concurrency=1)
        self.workers = [
            remote.remote(algorithm, i, seed_fn, state_root, resume_round, torch_threads) for i in range(n)
        ]

    def start(self) -> None:
        import ray

        ray.get([w.ready.remote() for w in self.workers])

    def worker_of(self, client_id: int) -> int:
        return client_id % len(self.workers)

    def run_round(self, msg, client_ids: list[int]) -> RoundOutput:
        import ray

        t0 = time.perf_counter()
        msg_ref = ray.put(msg)  # one copy in the object store, shared by every worker
        groups: dict[int, list[int]] = {}
        for cid in client_ids:
            groups.setdefault(self.worker_of(cid), []).append(cid)
        pending = [self.workers[w].run.remote(msg_ref, ids) for w, ids in sorted(groups.items())]
        partials = []
        while pending:  # collect partials as they complete
            done, pending = ray.wait(pending, num_returns=1)
            partials.extend(ray.get(done))
        return merge_partials(self.algorithm, msg, partials, time.perf_counter() - t0)

    def peak_rss_mb(self) -> list[float]:
        import ray

        return ray.get([w.peak_rss_mb.remote() for w in self.workers])

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w)
