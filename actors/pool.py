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
    workers: int = 0  # remote workers that served the round (0: in this process)


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
        return _run_inline(self.worker, self.algorithm, msg, client_ids, versions, keep)

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
    with `assignment: sticky` client c runs on the (c mod n)-th ready worker (its state
    stays in that worker's memory), with `balanced` each round's clients are spread by
    data size. `dedicated`: one actor per client, each with its own resources.

    The pool is elastic (pooled placement): a worker serves clients from the first round
    that starts after it is ready (e.g. an autoscaler added its node); a worker that dies
    leaves the pool, its clients of the running round re-run on live workers, and it
    rejoins once Ray has restarted it. Results never depend on which worker ran a client
    (per-client seeds, versioned state on disk, an order-independent fold). With an
    `inline` worker (a ClientWorker in the driver's process, model already built), rounds
    run in-process while no remote worker is ready, e.g. while they import torch and
    build their models at start-up; it is dropped once every worker is ready."""

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
        inline: ClientWorker | None = None,
        start_wait_s: float = 60.0,
        resources: dict[str, float] | None = None,
        placement_strategy: str = "PACK",
    ):
        import ray

        self.algorithm = algorithm
        self.placement = placement
        self.assignment = assignment
        self.max_restarts = max_restarts
        self.start_wait_s = start_wait_s
        self.inline = inline if placement == "pooled" else None
        n = num_clients if placement == "dedicated" else num_workers
        resources = dict(resources or {})
        actor_options = dict(
            num_cpus=num_cpus, num_gpus=num_gpus, resources=resources, max_restarts=max_restarts, max_task_retries=0
        )
        remote = ray.remote(ClientWorker).options(**actor_options)
        args = (seed_fn, state_root, torch_threads, state_memory_bytes, keep_versions)
        self.placement_group = None
        if placement == "dedicated":
            # One bundle per client actor, reserved together: the run starts when every
            # client has its resources, not with some clients waiting for others' GPUs.
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            bundle = {"CPU": num_cpus, "GPU": num_gpus, **resources}
            bundle = {k: v for k, v in bundle.items() if v}
            self.placement_group = placement_group([bundle] * n, strategy=placement_strategy, name="raysim-clients")
            self.workers = [
                ray.remote(ClientWorker)
                .options(
                    **actor_options,
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=i),
                )
                .remote(algorithm, i, *args)
                for i in range(n)
            ]
        else:
            self.workers = [remote.remote(algorithm, i, *args) for i in range(n)]
        self.ready: set[int] = set()  # workers that take clients
        self.dead: set[int] = set()  # gone for good (restarts exhausted)
        self.probes: dict = {}  # ready() call in flight -> worker index
        self.deaths = [0] * n

    # ---------------------------------------------------------------- membership

    def start(self) -> None:
        """Ask every worker to build its model. Dedicated placement waits for all; pooled
        placement waits for all for up to `start_wait_s` (then goes on with those ready),
        and not at all when an inline worker can serve the first rounds."""
        import ray

        for i in range(len(self.workers)):
            self._probe(i)
        if self.inline is not None:
            self.inline.ready()
            return
        deadline = time.monotonic() + self.start_wait_s
        while self.probes:
            left = deadline - time.monotonic()
            if self.placement == "pooled" and self.ready and left <= 0:
                break
            timeout = None if self.placement == "dedicated" or not self.ready else left
            done, _ = ray.wait(list(self.probes), num_returns=1, timeout=timeout)
            for ref in done:
                self._settle(ref)
        if not self.ready:
            self._wait_for_any()

    def _probe(self, i: int) -> None:
        self.probes[self.workers[i].ready.remote()] = i

    def _settle(self, ref) -> None:
        import ray
        from ray.exceptions import RayActorError

        i = self.probes.pop(ref)
        try:
            ray.get(ref)
            self.ready.add(i)
        except RayActorError:
            self._lost(i)

    def _lost(self, i: int) -> None:
        """Worker i died: out of the pool; probe it again unless Ray will not restart it."""
        self.ready.discard(i)
        self.deaths[i] += 1
        if 0 <= self.max_restarts < self.deaths[i]:
            self.dead.add(i)
        elif i not in self.probes.values():
            self._probe(i)

    def refresh(self) -> list[int]:
        """Admit workers that became ready since the last call; the active workers, sorted."""
        import ray

        if self.probes:
            done, _ = ray.wait(list(self.probes), num_returns=len(self.probes), timeout=0)
            for ref in done:
                self._settle(ref)
        if self.inline is not None and len(self.ready) == len(self.workers):
            self.inline.close()  # every worker is up: free the driver's copy of the model
            self.inline = None
        return sorted(self.ready)

    def _wait_for_any(self) -> None:
        import ray

        while not self.ready:
            if not self.probes:
                raise RuntimeError(f"all {len(self.workers)} client workers died and none will be restarted")
            done, _ = ray.wait(list(self.probes), num_returns=1)
            self._settle(done[0])

    def _live_after(self, w: int) -> int | None:
        """The live worker that takes over from w (None: run inline)."""
        if not self.ready:
            if self.inline is not None:
                return None
            self._wait_for_any()
        later = [r for r in sorted(self.ready) if r > w]
        return later[0] if later else min(self.ready)

    # ---------------------------------------------------------------- rounds

    def home(self, client_id: int, active: list[int]) -> int:
        if self.placement == "dedicated":
            return client_id
        return active[client_id % len(active)]

    def groups(self, client_ids: list[int], active: list[int]) -> dict[int, list[int]]:
        if self.placement == "pooled" and self.assignment == "balanced":
            cost = getattr(self.algorithm, "client_cost", lambda c: 1.0)
            by_slot = balanced_groups(client_ids, len(active), cost, lambda c: client_id_slot(c, active))
            return {active[s]: ids for s, ids in by_slot.items()}
        groups: dict[int, list[int]] = {}
        for cid in client_ids:
            groups.setdefault(self.home(cid, active), []).append(cid)
        return groups

    def _active(self) -> list[int]:
        active = self.refresh()
        if self.placement == "dedicated" and len(active) + len(self.dead) < len(self.workers):
            self.start()  # dedicated: every client needs its own actor
            active = self.refresh()
        return active

    def run_round(
        self,
        msg,
        client_ids: list[int],
        versions: dict[int, int],
        keep: int | None = None,
        deadline_s: float | None = None,
        min_results: int | None = None,
    ) -> RoundOutput:
        active = self._active()
        # In one process a straggler cannot be left behind: rounds with a deadline wait for
        # the workers, whose pull-based queue drops late results.
        if not active and self.inline is not None and deadline_s is None:
            out = _run_inline(self.inline, self.algorithm, msg, client_ids, versions, keep)
            out.workers = 0
            return out
        if not active:
            self._wait_for_any()
            active = sorted(self.ready)
        if (keep is not None and keep < len(client_ids)) or deadline_s is not None:
            out = self._run_first_k(msg, client_ids, versions, keep or len(client_ids), deadline_s, min_results, active)
        else:
            out = self._run_all(msg, client_ids, versions, active)
        out.workers = len(active)
        return out

    def _run_first_k(self, msg, client_ids, versions, keep, deadline_s, min_results, active) -> RoundOutput:
        """Clients are pulled from a queue one at a time by whichever worker is free, so a
        straggler holds up only its own worker. The first `keep` results are folded; after
        `deadline_s`, the round ends as soon as `min_results` are in. Results still running
        or never started are dropped and counted as late, never folded."""
        import ray
        from ray.exceptions import RayActorError

        t0 = time.perf_counter()
        msg_ref = ray.put(msg)
        queue = sorted(client_ids, key=lambda c: (self.home(c, active), c))
        pending: dict = {}
        accepted: dict[int, Partial] = {}

        def dispatch(w: int | None) -> None:
            if not queue:
                return
            if w is None:  # no live worker: the inline worker takes the next client now
                cid = queue.pop(0)
                accepted[cid] = self.inline.run(msg, [cid], versions)
                return
            # prefer a client whose state lives on this worker
            pick = next((c for c in queue if self.home(c, active) == w), queue[0])
            queue.remove(pick)
            pending[self.workers[w].run.remote(msg_ref, [pick], versions)] = (pick, w)

        for w in active[: len(queue)]:
            dispatch(w)
        requeued, failures = [], 0
        need_after_deadline = min(min_results or keep, keep)
        while (pending or queue) and len(accepted) < keep:
            timeout = None
            if deadline_s is not None:
                left = deadline_s - (time.perf_counter() - t0)
                if left <= 0 and len(accepted) >= need_after_deadline:
                    break
                timeout = left if left > 0 else None
            if not pending:  # every worker died and the inline worker took a client
                dispatch(self._live_after(-1))
                continue
            # A worker that becomes ready mid-round starts pulling clients at once.
            done, _ = ray.wait(list(pending) + list(self.probes), num_returns=1, timeout=timeout)
            if not done:
                continue  # the deadline passed: re-check whether enough results are in
            if done[0] in self.probes:
                joined = self.probes[done[0]]
                self._settle(done[0])
                if joined in self.ready and joined not in active:
                    active.append(joined)
                    active.sort()
                    dispatch(joined)
                continue
            cid, w = pending.pop(done[0])
            try:
                accepted[cid] = ray.get(done[0])
            except RayActorError:
                failures += 1
                requeued.append(cid)
                queue.insert(0, cid)
                self._lost(w)
                w = self._live_after(w)
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

    def _run_all(self, msg, client_ids: list[int], versions: dict[int, int], active: list[int]) -> RoundOutput:
        import ray
        from ray.exceptions import RayActorError

        t0 = time.perf_counter()
        msg_ref = ray.put(msg)  # one copy in the object store, shared by every worker
        groups = self.groups(client_ids, active)
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
                # them on a live worker; it rejoins once Ray has restarted it. The partial
                # keeps its slot in the merge order, so the result is unchanged.
                failures += 1
                requeued.extend(ids)
                self._lost(w)
                retry = self._live_after(w)
                if retry is not None:
                    pending[self.workers[retry].run.remote(msg_ref, ids, versions)] = (slot, retry, ids)
                    continue
                part = self.inline.run(msg, ids, versions)
            part.worker = slot
            merger.add(part)
        out = merger.out
        out.transfer_s = max(0.0, time.perf_counter() - t0 - out.compute_s - out.merge_s)
        out.requeued, out.worker_failures = sorted(requeued), failures
        out.accepted = sorted(client_ids)
        return out

    def client_call(self, fn, client_ids: list[int], *args) -> dict[int, Any]:
        import ray

        active = self._active()
        if not active and self.inline is not None:
            return self.inline.client_call(fn, client_ids, *args)
        if not active:
            self._wait_for_any()
            active = sorted(self.ready)
        refs = [self.workers[w].client_call.remote(fn, ids, *args) for w, ids in self.groups(client_ids, active).items()]
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

        return ray.get([self.workers[w].peak_rss_mb.remote() for w in self.refresh()])

    def store_stats(self) -> list[dict]:
        import ray

        return ray.get([self.workers[w].store_stats.remote() for w in self.refresh()])

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w)
        if self.placement_group is not None:
            from ray.util.placement_group import remove_placement_group

            remove_placement_group(self.placement_group)
            self.placement_group = None
        if self.inline is not None:
            self.inline.close()
            self.inline = None


def client_id_slot(client_id: int, active: list[int]) -> int:
    """Sticky slot of a client among the active workers (its home under `sticky`)."""
    return client_id % len(active)


def _run_inline(worker: ClientWorker, algorithm, msg, client_ids: list[int], versions: dict[int, int], keep: int | None):
    """Runs clients in id order in this process; with over-selection the first `keep`
    finish and the rest are never started (in one process the first to finish are the
    first started)."""
    t0 = time.perf_counter()
    run = sorted(client_ids)[: keep or len(client_ids)]
    part = worker.run(msg, run, versions)
    part.worker = 0
    merger = OrderedMerger(algorithm, msg, [0])
    merger.add(part)
    out = merger.out
    out.transfer_s = max(0.0, time.perf_counter() - t0 - part.compute_s)
    out.accepted, out.late = run, sorted(set(client_ids) - set(run))
    return out
