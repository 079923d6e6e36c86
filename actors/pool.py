"""Executors that run one round's clients: in-process (local mode) or on a pool of
ClientWorker Ray actors. Both return the round's fold, merged in worker order."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from actors.worker import ClientWorker, Partial


@dataclass
class RoundOutput:
    acc: Any
    client_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    num_examples: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    compute_s: float = 0.0  # the busiest worker's compute time
    transfer_s: float = 0.0  # dispatch to last partial, beyond the busiest worker's compute
    merge_s: float = 0.0
    requeued: list[int] = field(default_factory=list)  # clients re-run after their worker died
    worker_failures: int = 0
    accepted: list[int] = field(default_factory=list)  # clients whose results were folded
    late: list[int] = field(default_factory=list)  # sampled, but dropped (deadline / over-selection)


class OrderedMerger:
    """Merges partials in worker order as soon as the next one in order has arrived, so
    the result never depends on timing and at most one partial per worker is held."""

    def __init__(self, algorithm, msg, order: list[int]):
        self.algorithm = algorithm
        self.out = RoundOutput(algorithm.zero(msg))
        self.order = order
        self.next = 0
        self.waiting: dict[int, Partial] = {}

    def add(self, part: Partial) -> None:
        self.waiting[part.worker] = part
        while self.next < len(self.order) and self.order[self.next] in self.waiting:
            p = self.waiting.pop(self.order[self.next])
            t0 = time.perf_counter()
            out = self.out
            out.acc = self.algorithm.merge(out.acc, p.acc)
            p.acc = None  # drop the partial now, not when the round ends
            out.merge_s += time.perf_counter() - t0
            out.client_metrics.update(p.client_metrics)
            out.num_examples += p.num_examples
            out.bytes_up += p.bytes_up
            out.bytes_down += p.bytes_down
            out.compute_s = max(out.compute_s, p.compute_s)
            self.next += 1


def balanced_groups(client_ids: list[int], num_workers: int, cost: Callable[[int], float], home: Callable[[int], int]):
    """Greedy longest-first assignment to the least-loaded worker (ties: the client's home
    worker, where its state already is). Deterministic for the same inputs."""
    load = [0.0] * num_workers
    groups: dict[int, list[int]] = {}
    for cid in sorted(client_ids, key=lambda c: (-cost(c), c)):
        best = min(range(num_workers), key=lambda w: (load[w], w != home(cid), w))
        load[best] += cost(cid)
        groups.setdefault(best, []).append(cid)
    return groups


class LocalPool:
    """runtime.num_workers == 0: the same worker code, in this process, no Ray."""

    def __init__(self, algorithm, seed_fn, state_root: str, state_memory_bytes: int | None = None, keep_versions: int = 2):
        import torch

        self.algorithm = algorithm
        self.worker = ClientWorker(
            algorithm, 0, seed_fn, state_root, torch.get_num_threads(), state_memory_bytes, keep_versions
        )

    def start(self) -> None:
        self.worker.ready()

    def run_round(self, msg, client_ids: list[int], versions: dict[int, int], keep: int | None = None, **_) -> RoundOutput:
        """Runs clients in id order; with over-selection the first `keep` finish and the rest
        are never started (in one process the first to finish are the first started)."""
        t0 = time.perf_counter()
        run = sorted(client_ids)[: keep or len(client_ids)]
        part = self.worker.run(msg, run, versions)
        merger = OrderedMerger(self.algorithm, msg, [0])
        merger.add(part)
        out = merger.out
        out.transfer_s = max(0.0, time.perf_counter() - t0 - part.compute_s)
        out.accepted, out.late = run, sorted(set(client_ids) - set(run))
        return out

    def client_call(self, fn, client_ids: list[int], *args) -> dict[int, Any]:
        return self.worker.client_call(fn, client_ids, *args)

    def peak_rss_mb(self) -> list[float]:
        return []

    def store_stats(self) -> list[dict]:
        return [self.worker.store_stats()]

    def shutdown(self) -> None:
        pass


class RayPool:
    """A pool of ClientWorker actors. `pooled`: `num_workers` actors serve all clients;
    with `assignment: sticky` client c always runs on worker c % num_workers (its state
    stays in that worker's memory), with `balanced` each round's clients are spread by
    data size. `dedicated`: one actor per client, each with its own resources.
    A worker that dies is restarted by Ray; its clients are re-run on live workers."""

    def __init__(
        self,
        algorithm,
        seed_fn: Callable[[int, int], int],
        state_root: str,
        num_clients: int,
        num_workers: int,
        placement: str,
        assignment: str,
        num_cpus: float,
        num_gpus: float,
        torch_threads: int,
        state_memory_bytes: int | None = None,
        max_restarts: int = -1,
        keep_versions: int = 2,
    ):
        import ray

        self.algorithm = algorithm
        self.placement = placement
        self.assignment = assignment
        n = num_clients if placement == "dedicated" else num_workers
        remote = ray.remote(ClientWorker).options(
            num_cpus=num_cpus, num_gpus=num_gpus, max_restarts=max_restarts, max_task_retries=0
        )
        args = (seed_fn, state_root, torch_threads, state_memory_bytes, keep_versions)
        self.workers = [remote.remote(algorithm, i, *args) for i in range(n)]

    def start(self) -> None:
        import ray

        ray.get([w.ready.remote() for w in self.workers])

    def home(self, client_id: int) -> int:
        return client_id % len(self.workers)

    def groups(self, client_ids: list[int]) -> dict[int, list[int]]:
        if self.placement == "pooled" and self.assignment == "balanced":
            cost = getattr(self.algorithm, "client_cost", lambda c: 1.0)
            return balanced_groups(client_ids, len(self.workers), cost, self.home)
        groups: dict[int, list[int]] = {}
        for cid in client_ids:
            groups.setdefault(self.home(cid), []).append(cid)
        return groups

    def run_round(
        self,
        msg,
        client_ids: list[int],
        versions: dict[int, int],
        keep: int | None = None,
        deadline_s: float | None = None,
        min_results: int | None = None,
    ) -> RoundOutput:
        if (keep is not None and keep < len(client_ids)) or deadline_s is not None:
            return self._run_first_k(msg, client_ids, versions, keep or len(client_ids), deadline_s, min_results)
        return self._run_all(msg, client_ids, versions)

    def _run_first_k(self, msg, client_ids, versions, keep, deadline_s, min_results) -> RoundOutput:
        """Clients are pulled from a queue one at a time by whichever worker is free, so a
        straggler holds up only its own worker. The first `keep` results are folded; after
        `deadline_s`, the round ends as soon as `min_results` are in. Results still running
        or never started are dropped and counted as late, never folded."""
        import ray
        from ray.exceptions import RayActorError

        t0 = time.perf_counter()
        msg_ref = ray.put(msg)
        queue = sorted(client_ids, key=lambda c: (self.home(c), c))
        pending: dict = {}

        def dispatch(w: int) -> None:
            if queue:
                # prefer a client whose state lives on this worker
                pick = next((c for c in queue if self.home(c) == w), queue[0])
                queue.remove(pick)
                pending[self.workers[w].run.remote(msg_ref, [pick], versions)] = (pick, w)

        for w in range(min(len(self.workers), len(queue))):
            dispatch(w)
        accepted: dict[int, Partial] = {}
        requeued, failures = [], 0
        need_after_deadline = min(min_results or keep, keep)
        while pending and len(accepted) < keep:
            timeout = None
            if deadline_s is not None:
                left = deadline_s - (time.perf_counter() - t0)
                if left <= 0 and len(accepted) >= need_after_deadline:
                    break
                timeout = left if left > 0 else None
            done, _ = ray.wait(list(pending), num_returns=1, timeout=timeout)
            if not done:
                continue  # the deadline passed: re-check whether enough results are in
            cid, w = pending.pop(done[0])
            try:
                accepted[cid] = ray.get(done[0])
            except RayActorError:
                failures += 1
                requeued.append(cid)
                queue.insert(0, cid)
                w = (w + 1) % len(self.workers)
            dispatch(w)
        merger = OrderedMerger(self.algorithm, msg, sorted(accepted))
        for cid, part in accepted.items():
            part.worker = cid  # merge order: client id
            merger.add(part)
        out = merger.out
        out.transfer_s = max(0.0, time.perf_counter() - t0 - out.compute_s - out.merge_s)
        out.requeued, out.worker_failures = sorted(requeued), failures
        out.accepted = sorted(accepted)
        out.late = sorted([c for c, _ in pending.values()] + queue)
        return out

    def _run_all(self, msg, client_ids: list[int], versions: dict[int, int]) -> RoundOutput:
        import ray
        from ray.exceptions import RayActorError

        t0 = time.perf_counter()
        msg_ref = ray.put(msg)  # one copy in the object store, shared by every worker
        groups = self.groups(client_ids)
        merger = OrderedMerger(self.algorithm, msg, sorted(groups))
        pending = {self.workers[w].run.remote(msg_ref, ids, versions): (w, w, ids) for w, ids in groups.items()}
        requeued, failures = [], 0
        while pending:  # collect partials as they complete
            done, _ = ray.wait(list(pending), num_returns=1)
            slot, w, ids = pending.pop(done[0])
            try:
                part = ray.get(done[0])
            except RayActorError:
                # The worker died (its clients' state of earlier rounds is on disk): re-run
                # them on the next worker; Ray restarts the dead one for later rounds. The
                # partial keeps its slot in the merge order, so the result is unchanged.
                failures += 1
                requeued.extend(ids)
                retry = (w + 1) % len(self.workers)
                pending[self.workers[retry].run.remote(msg_ref, ids, versions)] = (slot, retry, ids)
                continue
            part.worker = slot
            merger.add(part)
        out = merger.out
        out.transfer_s = max(0.0, time.perf_counter() - t0 - out.compute_s - out.merge_s)
        out.requeued, out.worker_failures = sorted(requeued), failures
        out.accepted = sorted(client_ids)
        return out

    def client_call(self, fn, client_ids: list[int], *args) -> dict[int, Any]:
        import ray

        refs = [self.workers[w].client_call.remote(fn, ids, *args) for w, ids in self.groups(client_ids).items()]
        out: dict[int, Any] = {}
        for part in ray.get(refs):
            out.update(part)
        return out

    def pids(self, timeout_s: float = 120.0) -> list[int]:
        """Worker process ids, waiting for restarting workers to come back."""
        import ray
        from ray.exceptions import ActorUnavailableError

        deadline = time.monotonic() + timeout_s
        while True:
            try:
                return ray.get([w.pid.remote() for w in self.workers])
            except ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def peak_rss_mb(self) -> list[float]:
        import ray

        return ray.get([w.peak_rss_mb.remote() for w in self.workers])

    def store_stats(self) -> list[dict]:
        import ray

        return ray.get([w.store_stats.remote() for w in self.workers])

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w)
