"""The contract for everything that crosses an actor boundary.

An algorithm is a plain object (no Ray): the runtime calls `client_step` inside a
ClientWorker for each sampled client, folds the results with
`zero/accumulate/merge`, and calls `finalize` in the driver. Because the fold is
associative and workers fold their clients in client-id order while the driver
merges partials in worker order, results never depend on timing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Protocol, runtime_checkable

import numpy as np
import torch

Tensors = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Broadcast:
    """What the driver sends to every sampled client in one round (ray.put once)."""

    round: int
    tensors: Tensors
    payload: Mapping[str, Any] = field(default_factory=dict)

    # The tensors travel as numpy arrays, which Ray writes into its object store straight
    # from the driver's tensors (no pickled copy in the driver's heap). A worker copies them
    # out: clients may change what they receive (e.g. train a head initialised from it).
    def __getstate__(self):
        return {**self.__dict__, "tensors": {k: _to_numpy(t) for k, t in self.tensors.items()}}

    def __setstate__(self, state):
        tensors = {k: torch.from_numpy(a.copy()) if isinstance(a, np.ndarray) else a for k, a in state["tensors"].items()}
        object.__setattr__(self, "__dict__", {**state, "tensors": tensors})


def _to_numpy(t: torch.Tensor):
    if t.device.type == "cpu" and not t.requires_grad and t.dtype in (torch.float32, torch.float64, torch.int64):
        return t.numpy()
    return t  # bf16, GPU, or autograd tensors pickle as tensors


@dataclass(frozen=True)
class ClientResult:
    client_id: int
    num_examples: int
    tensors: Tensors
    metrics: Mapping[str, float] = field(default_factory=dict)


@dataclass
class ClientContext:
    """What a client step may use. `state` persists on the worker between rounds
    (adapter, optimizer moments, ...); the step may replace its entries."""

    client_id: int
    round: int
    seed: int  # derived from (experiment seed, round, client id)
    data: Any
    resident: Any  # the worker's resident objects (frozen base model, ...), built once
    state: dict[str, Any]


@runtime_checkable
class Algorithm(Protocol):
    """Names mirror DESIGN.md. `Acc` is whatever the fold carries; it must pickle."""

    def init_server(self) -> Any: ...

    def broadcast(self, state: Any, round: int, client_ids: list[int]) -> Broadcast: ...

    def build_resident(self) -> Any:
        """Build the objects a worker keeps for its lifetime (called once per worker)."""
        ...

    def client_data(self, client_id: int) -> Any:
        """Load one client's private data (called inside the worker that serves it)."""
        ...

    def client_step(self, ctx: ClientContext, msg: Broadcast) -> ClientResult: ...

    def zero(self, msg: Broadcast) -> Any: ...

    def accumulate(self, acc: Any, result: ClientResult) -> Any: ...

    def merge(self, a: Any, b: Any) -> Any:
        """May update `a` (the fold's own accumulator) in place; `b` is only read."""
        ...

    def finalize(self, state: Any, acc: Any) -> Any: ...

    def evaluate(self, state: Any) -> dict[str, float]: ...

    def state_tensors(self, state: Any) -> Tensors:
        """Flatten the server state for a checkpoint."""
        ...

    def load_state_tensors(self, tensors: Tensors) -> Any: ...


def tensors_nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
