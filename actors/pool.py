"""Executors that run one round's clients: in-process (local mode) or on a pool of
ClientWorker Ray actors. Both return the round's fold, merged in worker order."""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass, field
from typing import Any, Callable

from actors.protocol import client_cost
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
    served: dict[int, int] = field(default_factory=dict)  # client -> worker index (-1: the driver's process)


@dataclass
class Requeued:
    """A round's worker losses: how many, and the clients re-run elsewhere."""

    failures: int = 0
    clients: list[int] = field(default_factory=list)


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


@dataclass(frozen=True)
class WorkerGroup:
    """A set of workers with the same resources; `client_group` says which clients it serves."""

    name: str
    num_workers: int
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    resources: dict[str, float] = field(default_factory=dict)


MONITOR = "monitor"  # the workers' concurrency group for calls that only read


class RayPool:
    """A pool of ClientWorker actors in worker groups (one group unless clients come in
    families with their own resources): a client only ever runs on a worker of its group
    (`client_group[c]`), and everything below holds within each group. `pooled`: a group's
    `num_workers` actors serve its clients; with `assignment: sticky` client c runs on the
    (c mod n)-th ready worker of its group (its state stays in that worker's memory), with
    `balanced` each round's clients are spread by data size. `dedicated`: one actor per
    client, each with its group's resources.

    The pool is elastic (pooled placement): a worker serves clients from the first round
    that starts after it is ready (e.g. an autoscaler added its node); a worker that dies
    leaves the pool, its clients of the running round re-run on live workers, and it
    rejoins once Ray has restarted it. Results never depend on which worker ran a client
    (per-client seeds, versioned state on disk, an order-independent fold). With an
    `inline` worker (a ClientWorker in the driver's process, model already built), rounds
    run in-process while no remote worker is ready, e.g. while they import torch and
    build their models at start-up (until every group that has clients has a ready
    worker); it is dropped once every worker is ready."""

    def __init__(
        self,
        algorithm,
        seed_fn: Callable[[int, int], int],
        state_root: str,
        num_clients: int,
        groups: list[WorkerGroup],
        placement: str,
        assignment: str,
        torch_threads: int,
        state_memory_bytes: int | None = None,
        max_restarts: int = -1,
        keep_versions: int = 2,
        inline: ClientWorker | None = None,
        start_wait_s: float = 60.0,
        placement_strategy: str = "PACK",
        client_group: list[int] | None = None,
    ):
        import ray

        self.algorithm = algorithm
        self.placement = placement
        self.assignment = assignment
        self.max_restarts = max_restarts
        self.start_wait_s = start_wait_s
        self.inline = inline if placement == "pooled" else None
        self.client_group = list(client_group) if client_group is not None else [0] * num_clients
        self.group_specs = list(groups)
        # Worker i belongs to group group_of[i]: pooled, each group's actors in a block in
        # group order; dedicated, worker i is client i's actor.
        if placement == "dedicated":
            self.group_of = list(self.client_group)
        else:
            self.group_of = [g for g, spec in enumerate(self.group_specs) for _ in range(spec.num_workers)]
        n = len(self.group_of)
        # "image-0", "image-1", ...: the k-th worker of its group (records say who served whom)
        self.labels = [f"{self.group_specs[g].name}-{self.group_of[:i].count(g)}" for i, g in enumerate(self.group_of)]
        self.needed = sorted(set(self.client_group))  # groups that have clients

        def options(g: int) -> dict:
            spec = self.group_specs[g]
            return dict(
                num_cpus=spec.num_cpus, num_gpus=spec.num_gpus, resources=dict(spec.resources),
                max_restarts=max_restarts, max_task_retries=0,
            )  # fmt: skip

        args = (seed_fn, state_root, torch_threads, state_memory_bytes, keep_versions)
        # pid / peak memory / store stats answer from their own thread, even while the worker
        # runs a straggler (the default group still runs one call at a time)
        worker_actor = ray.remote(concurrency_groups={MONITOR: 1})(ClientWorker)
        self.placement_group = None
        if placement == "dedicated":
            # One bundle per client actor (its group's resources), reserved together: the run
            # starts when every client has its resources, not with some waiting for others' GPUs.
            from ray.util.placement_group import placement_group
            from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

            bundles = []
            for g in self.group_of:
                spec = self.group_specs[g]
                bundle = {"CPU": spec.num_cpus, "GPU": spec.num_gpus, **spec.resources}
                bundles.append({k: v for k, v in bundle.items() if v})
            self.placement_group = placement_group(bundles, strategy=placement_strategy, name="raysim-clients")
            self.workers = [
                worker_actor
                .options(
                    **options(g),
                    scheduling_strategy=PlacementGroupSchedulingStrategy(self.placement_group, placement_group_bundle_index=i),
                )
                .remote(algorithm, i, *args)
                for i, g in enumerate(self.group_of)
            ]
        else:
            self.workers = [
                worker_actor.options(**options(g)).remote(algorithm, i, *args) for i, g in enumerate(self.group_of)
            ]
        # Which worker's memory holds each client's newest state, and, per worker, clients
        # whose copy there another worker has since superseded (told to it with its next
        # call): with balanced assignment clients move, and a worker would otherwise keep a
        # dead copy of every client it ever served.
        self.holder: dict[int, int] = {}
        self.stale: dict[int, set[int]] = {}
        self.ready: set[int] = set()  # workers that take clients
        self.dead: set[int] = set()  # gone for good (restarts exhausted)
        self.probes: dict = {}  # ready() call in flight -> worker index
        self.deaths = [0] * n

    # ---------------------------------------------------------------- membership

    def start(self) -> None:
        """Ask every worker to build its model. Dedicated placement waits for all; pooled
        placement waits for all for up to `start_wait_s` (then goes on once every group
        with clients has a ready worker), and not at all when an inline worker can serve
        the first rounds."""
        import ray

        for i in range(len(self.workers)):
            self._probe(i)
        if self.inline is not None:
            self.inline.ready()
            return
        deadline = time.monotonic() + self.start_wait_s
        while self.probes:
            left = deadline - time.monotonic()
            served = self._groups_served()
            if self.placement == "pooled" and served and left <= 0:
                break
            timeout = None if self.placement == "dedicated" or not served else left
            done, _ = ray.wait(list(self.probes), num_returns=1, timeout=timeout)
            for ref in done:
                self._settle(ref)
        for g in self.needed:
            self._wait_for_group(g)

    def _in_group(self, g: int, workers) -> list[int]:
        return sorted(w for w in workers if self.group_of[w] == g)

    def _groups_served(self, active=None) -> bool:
        """Every group with clients has a ready worker."""
        ready = self.ready if active is None else active
        return all(self._in_group(g, ready) for g in self.needed)

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

    def _forget(self, w: int) -> list[int]:
        """The stale copies to drop on worker w, handed over once."""
        return sorted(self.stale.pop(w, ()))

    def _note_served(self, served: dict[int, int]) -> None:
        for c, w in served.items():
            h = self.holder.get(c)
            if h is not None and h != w and h >= 0:
                self.stale.setdefault(h, set()).add(c)
            self.stale.get(w, set()).discard(c)
            self.holder[c] = w

    def _requeue(self, w: int, client_ids: list[int], lost: Requeued) -> int | None:
        """Worker `w` died running `client_ids` (their state of earlier rounds is on disk):
        note it, and name the live worker of its group that re-runs them (None: none is
        left; the inline worker takes them). `w` rejoins once Ray has restarted it."""
        lost.failures += 1
        lost.clients.extend(client_ids)
        self._lost(w)
        return self._live_after(w)

    def _lost(self, i: int) -> None:
        """Worker i died: out of the pool; probe it again unless Ray will not restart it."""
        self.stale.pop(i, None)  # its memory went with it
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

    def _wait_for_group(self, g: int) -> None:
        """Until group g has a ready worker."""
        import ray

        while not self._in_group(g, self.ready):
            probes = [ref for ref, w in self.probes.items() if self.group_of[w] == g]
            if not probes:
                members = self._in_group(g, range(len(self.workers)))
                raise RuntimeError(
                    f"all {len(members)} client workers of group '{self.group_specs[g].name}' died and none will be restarted"
                )
            done, _ = ray.wait(probes, num_returns=1)
            self._settle(done[0])

    def _live_after(self, w: int, g: int | None = None) -> int | None:
        """The live worker of w's group (or of group g) that takes over from w (None: run inline)."""
        g = self.group_of[w] if g is None else g
        if not self._in_group(g, self.ready):
            if self.inline is not None:
                return None
            self._wait_for_group(g)
        live = self._in_group(g, self.ready)
        later = [r for r in live if r > w]
        return later[0] if later else live[0]

    # ---------------------------------------------------------------- rounds

    def home(self, client_id: int, active: list[int]) -> int:
        if self.placement == "dedicated":
            return client_id
        mine = self._in_group(self.client_group[client_id], active)
        return mine[client_id_slot(client_id, mine)]

    def groups(self, client_ids: list[int], active: list[int]) -> dict[int, list[int]]:
        """Worker -> the clients it runs this round (each on a worker of its own group)."""
        if self.placement == "pooled" and self.assignment == "balanced":
            cost = functools.partial(client_cost, self.algorithm)
            out: dict[int, list[int]] = {}
            for g in sorted({self.client_group[c] for c in client_ids}):
                mine = self._in_group(g, active)
                ids = [c for c in client_ids if self.client_group[c] == g]
                by_slot = balanced_groups(ids, len(mine), cost, lambda c: client_id_slot(c, mine))
                out.update({mine[s]: ids for s, ids in by_slot.items()})
            return out
        groups: dict[int, list[int]] = {}
        for cid in client_ids:
            groups.setdefault(self.home(cid, active), []).append(cid)
        return groups

    def _serve_all_groups(self, active: list[int]) -> list[int]:
        """Wait until every group with clients has a ready worker; the active workers."""
        if not self._groups_served(active):
            for g in self.needed:
                self._wait_for_group(g)
            active = sorted(self.ready)
        return active

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
        if not self._groups_served(active) and self.inline is not None and deadline_s is None:
            out = _run_inline(self.inline, self.algorithm, msg, client_ids, versions, keep)
            out.workers = 0
            out.served = {c: -1 for c in out.accepted}
            self._note_served(out.served)
            return out
        active = self._serve_all_groups(active)
        if (keep is not None and keep < len(client_ids)) or deadline_s is not None:
            out = self._run_first_k(msg, client_ids, versions, keep or len(client_ids), deadline_s, min_results, active)
        else:
            out = self._run_all(msg, client_ids, versions, active)
        out.workers = len(active)
        self._note_served(out.served)
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

        served: dict[int, int] = {}

        def dispatch(w: int | None, g: int | None = None) -> None:
            if w is None:  # no live worker in group g: the inline worker takes its next client now
                cid = next((c for c in queue if self.client_group[c] == g), None)
                if cid is not None:
                    queue.remove(cid)
                    accepted[cid], served[cid] = self.inline.run(msg, [cid], versions), -1
                return
            # a client of this worker's group, preferably one whose state lives on it
            mine = [c for c in queue if self.client_group[c] == self.group_of[w]]
            if not mine:
                return  # nothing left for this group: the worker idles
            pick = next((c for c in mine if self.home(c, active) == w), mine[0])
            queue.remove(pick)
            pending[self.workers[w].run.remote(msg_ref, [pick], versions, self._forget(w))] = (pick, w)

        for w in list(active):
            dispatch(w)
        lost = Requeued()
        need_after_deadline = min(min_results or keep, keep)
        while (pending or queue) and len(accepted) < keep:
            timeout = None
            if deadline_s is not None:
                left = deadline_s - (time.perf_counter() - t0)
                if left <= 0 and len(accepted) >= need_after_deadline:
                    break
                timeout = left if left > 0 else None
            if not pending:  # every worker of a group died and the inline worker took a client
                g = self.client_group[queue[0]]
                dispatch(self._live_after(-1, g), g)
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
                accepted[cid], served[cid] = ray.get(done[0]), w
            except RayActorError:
                queue.insert(0, cid)
                g = self.group_of[w]
                w = self._requeue(w, [cid], lost)
                if w is None:
                    dispatch(None, g)
                    continue
            dispatch(w)
        merger = OrderedMerger(self.algorithm, msg, sorted(accepted))
        for cid, part in accepted.items():
            part.worker = cid  # merge order: client id
            merger.add(part)
        out = merger.out
        out.transfer_s = max(0.0, time.perf_counter() - t0 - out.compute_s - out.merge_s)
        out.requeued, out.worker_failures = sorted(lost.clients), lost.failures
        out.accepted = sorted(accepted)
        out.late = sorted([c for c, _ in pending.values()] + queue)
        for cid, w in pending.values():  # still running: the state they write on w is never read
            self.stale.setdefault(w, set()).add(cid)
        out.served = {c: served[c] for c in out.accepted}
        return out

    def _run_all(self, msg, client_ids: list[int], versions: dict[int, int], active: list[int]) -> RoundOutput:
        import ray
        from ray.exceptions import RayActorError

        t0 = time.perf_counter()
        msg_ref = ray.put(msg)  # one copy in the object store, shared by every worker
        groups = self.groups(client_ids, active)
        merger = OrderedMerger(self.algorithm, msg, sorted(groups))
        pending = {
            self.workers[w].run.remote(msg_ref, ids, versions, self._forget(w)): (w, w, ids) for w, ids in groups.items()
        }
        lost = Requeued()
        served: dict[int, int] = {}
        while pending:  # collect partials as they complete
            done, _ = ray.wait(list(pending), num_returns=1)
            slot, w, ids = pending.pop(done[0])
            try:
                part = ray.get(done[0])
                served.update({c: w for c in ids})
            except RayActorError:
                # The partial keeps its slot in the merge order, so the result is unchanged.
                retry = self._requeue(w, ids, lost)
                if retry is not None:
                    pending[self.workers[retry].run.remote(msg_ref, ids, versions, self._forget(retry))] = (slot, retry, ids)
                    continue
                part = self.inline.run(msg, ids, versions)
                served.update({c: -1 for c in ids})
            part.worker = slot
            merger.add(part)
        out = merger.out
        out.transfer_s = max(0.0, time.perf_counter() - t0 - out.compute_s - out.merge_s)
        out.requeued, out.worker_failures = sorted(lost.clients), lost.failures
        out.accepted = sorted(client_ids)
        out.served = {c: served[c] for c in out.accepted}
        return out

    def client_call(self, fn, client_ids: list[int], *args) -> dict[int, Any]:
        import ray

        active = self._active()
        if not self._groups_served(active) and self.inline is not None:
            return self.inline.client_call(fn, client_ids, *args)
        active = self._serve_all_groups(active)
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
                return ray.get([w.pid.options(concurrency_group=MONITOR).remote() for w in self.workers])
            except ActorUnavailableError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)

    def peak_rss_mb(self) -> list[float]:
        import ray

        return ray.get([self.workers[w].peak_rss_mb.options(concurrency_group=MONITOR).remote() for w in self.refresh()])

    def store_stats(self) -> list[dict]:
        import ray

        return ray.get([self.workers[w].store_stats.options(concurrency_group=MONITOR).remote() for w in self.refresh()])

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
