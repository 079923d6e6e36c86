"""RankGroup: one client's local training spread over N Ray actors (ranks 0..N-1) that
form one torch.distributed group, so a client can span several GPUs (or CPU processes).

The actors sit in one STRICT_PACK placement group (one node, as nccl between the ranks
of one client expects); each bundle asks for `num_cpus` and `num_gpus`. Rank 0 picks
the rendezvous: its node's IP and a port the OS says is free there, so every group has
its own. Each rank then builds its piece of the work with `factory(rank, world_size)`
and the caller drives all ranks with `call(method, *args)`.

What runs on a rank is up to the factory (an algorithm's object): this module only
places the processes and joins them into a group.
"""
from __future__ import annotations

import os
import socket
import weakref
from typing import Any, Callable

import ray
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy


def free_port() -> int:
    """A TCP port that is free on this node now (the usual bind-to-0 race applies)."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class RankActor:
    def __init__(self, rank: int, world_size: int, torch_threads: int, env: dict[str, str]):
        import torch

        # Set here, not through a runtime_env: Ray can then use a worker process it has
        # already started (a runtime_env means a fresh one, seconds more under load).
        os.environ.update(env)
        torch.set_num_threads(torch_threads)
        self.rank, self.world_size = rank, world_size
        self.obj = None

    def address(self) -> tuple[str, int]:
        return ray.util.get_node_ip_address(), free_port()

    def join(self, addr: str, port: int, backend: str, factory: Callable[[int, int], Any]) -> int:
        import torch.distributed as dist

        # Each rank sees only its own GPU(s) (Ray sets CUDA_VISIBLE_DEVICES per actor), so its
        # local device is always index 0.
        os.environ.update(RANK=str(self.rank), WORLD_SIZE=str(self.world_size), LOCAL_RANK="0",
                          MASTER_ADDR=addr, MASTER_PORT=str(port))
        dist.init_process_group(backend, rank=self.rank, world_size=self.world_size)
        self.obj = factory(self.rank, self.world_size)
        return os.getpid()

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.obj, method)(*args)


def _release(actors: list, pg) -> None:
    try:
        for a in actors:
            ray.kill(a)
        remove_placement_group(pg)
    except Exception:  # Ray already shut down (interpreter exit): nothing left to free
        pass


class RankGroup:
    def __init__(self, factory: Callable[[int, int], Any], world_size: int, num_cpus: float = 1.0,
                 num_gpus: float = 0.0, torch_threads: int = 1, env: dict[str, str] | None = None,
                 ready_timeout_s: float = 120.0):
        if not ray.is_initialized():
            raise RuntimeError(f"a group of {world_size} ranks runs as Ray actors: start Ray first "
                               "(runtime.num_workers >= 1, or ray.init() before a local-mode run)")
        bundle = {"CPU": num_cpus, **({"GPU": num_gpus} if num_gpus else {})}
        self.pg = placement_group([dict(bundle) for _ in range(world_size)], strategy="STRICT_PACK")
        try:
            ray.get(self.pg.ready(), timeout=ready_timeout_s)
        except ray.exceptions.GetTimeoutError:
            remove_placement_group(self.pg)
            raise RuntimeError(f"no node offered {world_size} x {bundle} for one client's rank group within "
                               f"{ready_timeout_s:.0f} s (cluster resources: {ray.cluster_resources()})") from None
        self.actors = [
            ray.remote(RankActor).options(
                num_cpus=num_cpus, num_gpus=num_gpus,
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, placement_group_bundle_index=r),
            ).remote(r, world_size, torch_threads, dict(env or {}))
            for r in range(world_size)
        ]
        self._finalizer = weakref.finalize(self, _release, self.actors, self.pg)
        addr, port = ray.get(self.actors[0].address.remote())
        backend = "nccl" if num_gpus else "gloo"
        self.world_size, self.addr, self.port = world_size, addr, port
        self.pids = self._all([a.join.remote(addr, port, backend, factory) for a in self.actors])

    def call(self, method: str, *args: Any) -> list[Any]:
        """`obj.method(*args)` on every rank at once (the arguments go to the object store
        once); the ranks' return values in rank order. If a rank fails, the others are
        likely waiting for it inside a collective: the group is closed and the error
        raised at once (the caller starts a new group if it wants one)."""
        refs = [ray.put(a) for a in args]
        return self._all([a.call.remote(method, *refs) for a in self.actors])

    def _all(self, results: list) -> list[Any]:
        pending = list(results)
        try:
            while pending:
                done, pending = ray.wait(pending, num_returns=1)
                ray.get(done)  # raises the first rank's error as soon as it is known
        except Exception:
            self.close()
            raise
        return ray.get(results)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def close(self) -> None:
        self._finalizer()
