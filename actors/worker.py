"""ClientWorker: keeps the frozen base model resident and serves many virtual clients,
folding their results in client-id order into one partial per call."""
from __future__ import annotations

import os
import resource
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from actors.protocol import ClientContext, bytes_down, rank_group_spec, tensors_nbytes
from actors.state_store import ClientStateStore


@dataclass
class Partial:
    worker: int
    acc: Any
    client_metrics: dict[int, dict[str, float]] = field(default_factory=dict)
    num_examples: int = 0
    bytes_up: int = 0
    bytes_down: int = 0
    compute_s: float = 0.0
    client_ids: list[int] = field(default_factory=list)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class ClientWorker:
    def __init__(
        self,
        algorithm: Any,
        index: int,
        seed_fn: Callable[[int, int], int],
        state_root: str,
        torch_threads: int,
        state_memory_bytes: int | None = None,
        keep_versions: int = 2,
    ):
        warnings.filterwarnings("ignore", category=UserWarning)
        self.threads_before = torch.get_num_threads()
        torch.set_num_threads(torch_threads)
        self.algorithm = algorithm
        self.index = index
        self.seed_fn = seed_fn
        self.store = ClientStateStore(state_root, state_memory_bytes, keep_versions)
        self.resident = None
        self.group = None  # the rank group of the algorithm's RankGroupSpec, started on first use

    def ready(self) -> int:
        """Build the resident model now, so the first round does not pay for it."""
        if self.resident is None:
            self.resident = self.algorithm.build_resident()
        return os.getpid()

    def close(self) -> None:
        """Drop the model and the rank group and restore the thread count (a worker inside
        the driver's process)."""
        self.resident = None
        if self.group is not None:
            self.group.close()
            self.group = None
        torch.set_num_threads(self.threads_before)

    def rank_group(self):
        """The ranks that train this worker's clients together (the algorithm's RankGroupSpec),
        kept for every client it serves; a group closed by a failed rank is replaced. None
        when the algorithm declares none."""
        spec = rank_group_spec(self.algorithm)
        if spec is None:
            return None
        if self.group is None or self.group.closed:
            from actors.rank_group import RankGroup  # imports Ray: only where a group is asked for

            self.group = RankGroup(spec.factory, spec.world_size, spec.num_cpus, spec.num_gpus, spec.torch_threads,
                                   dict(spec.env))
        return self.group

    def run(self, msg, client_ids: list[int], versions: dict[int, int], forget: list[int] = ()) -> Partial:
        """Run the clients (each from its state of round `versions[cid]`) and fold them.
        `forget`: clients whose newest state another worker wrote since they ran here; the
        copies of them kept in memory here can never be read again."""
        self.store.forget(forget)
        self.ready()
        t0 = time.perf_counter()
        part = Partial(self.index, self.algorithm.zero(msg), client_ids=sorted(client_ids))
        for cid in sorted(client_ids):
            state = dict(self.store.get(cid, versions.get(cid, 0)))
            ctx = ClientContext(cid, msg.round, self.seed_fn(msg.round, cid), None, self.resident, state,
                                self.rank_group())
            result = self.algorithm.client_step(ctx, msg)
            part.acc = self.algorithm.accumulate(part.acc, result)
            part.client_metrics[cid] = dict(result.metrics)
            part.num_examples += result.num_examples
            part.bytes_up += tensors_nbytes(result.tensors)
            part.bytes_down += bytes_down(self.algorithm, msg, cid)
            self.store.put(cid, msg.round, ctx.state, base=versions.get(cid, 0))
        part.compute_s = time.perf_counter() - t0
        return part

    def client_call(self, fn: Callable[..., Any], client_ids: list[int], *args: Any) -> dict[int, Any]:
        """Run `fn(client_id, *args)` here for each client (e.g. advertise a SecAgg key)."""
        return {cid: fn(cid, *args) for cid in sorted(client_ids)}

    def peak_rss_mb(self) -> float:
        return peak_rss_mb()

    def pid(self) -> int:
        return os.getpid()

    def store_stats(self) -> dict[str, int]:
        return {
            "clients_in_memory": len(self.store.memory),
            "memory_bytes": self.store.memory_bytes,
            "loads_from_disk": self.store.loads_from_disk,
        }
