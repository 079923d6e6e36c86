"""The contract for everything that crosses an actor boundary.

An algorithm is a plain object (no Ray): the runtime calls `client_step` inside a
ClientWorker for each sampled client, folds the results with
`zero/accumulate/merge`, and calls `finalize` in the driver. Because the fold is
associative and workers fold their clients in client-id order while the driver
merges partials in worker order, results never depend on timing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping, Protocol, runtime_checkable

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
    group: Any = None  # the rank group the worker built from the algorithm's RankGroupSpec (RankGroups)


@runtime_checkable
class Algorithm(Protocol):
    """The core every algorithm has (names mirror DESIGN.md). `Acc` is whatever the fold
    carries; it must pickle. Everything else an algorithm may do is one of the optional
    groups below, declared by implementing it and found with `isinstance`, never guessed."""

    def init_server(self) -> Any: ...

    def broadcast(self, state: Any, round: int, client_ids: list[int]) -> Broadcast: ...

    def build_resident(self) -> Any:
        """Build the objects a worker keeps for its lifetime (called once per worker)."""
        ...

    def client_step(self, ctx: ClientContext, msg: Broadcast) -> ClientResult: ...

    def zero(self, msg: Broadcast) -> Any: ...

    def accumulate(self, acc: Any, result: ClientResult) -> Any: ...

    def merge(self, a: Any, b: Any) -> Any:
        """May update `a` (the fold's own accumulator) in place; `b` is only read."""
        ...

    def finalize(self, state: Any, acc: Any) -> Any: ...

    def evaluate(self, state: Any) -> dict[str, float]: ...


# --- optional groups: what the runtime does without one is said in each -----------------


@runtime_checkable
class GuardableUpdates(Protocol):
    """Clients return tensors with the keys and shapes of a reference they were sent, so an
    update is `result - reference`: screening, simulated attacks, robust rules, DP and SecAgg
    apply (raysim/guard.py). Without it, those options are config errors."""

    def client_reference(self, msg: Broadcast, client_id: int) -> Tensors: ...


@runtime_checkable
class ClientFamilies(Protocol):
    """Clients of different kinds (e.g. CreamFL's image, text and image-text clients), which
    `runtime.worker_groups` can serve from groups of their own. Without it: one family,
    "default"."""

    def client_families(self) -> list[str]: ...

    def client_family(self, client_id: int) -> str: ...


@runtime_checkable
class LoraAggregation(Protocol):
    """The fold combines LoRA factors by `algorithm.lora_aggregation` (factors, product,
    hetlora). Without it, setting that key is a config error."""

    def lora_aggregation(self) -> str: ...


@runtime_checkable
class HeterogeneousRanks(Protocol):
    """Clients may train adapters of different ranks (`lora.client_ranks`). Without it,
    setting that key is a config error."""

    def client_rank(self, client_id: int) -> int: ...


@runtime_checkable
class LoraFineTuning(Protocol):
    """Clients fine-tune LoRA adapters on raysim's one LoRA path (raysim/lora/), which reads
    the `lora:` settings beyond the adapter's shape (lora.base, lora.backend, lora.quality,
    lora.contribution, lora.lock_text_tower, ...) and faults.caption_noise. Without it,
    setting those keys is a config error."""

    def lora_settings(self) -> Any: ...


@dataclass(frozen=True)
class RankGroupSpec:
    """A group of `world_size` processes that train one client together (one
    torch.distributed world): the worker starts them (actors/rank_group.py, one placement
    group of `num_cpus`/`num_gpus` bundles) and each rank builds `factory(rank, world_size)`."""

    factory: Callable[[int, int], Any]
    world_size: int
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    torch_threads: int = 1
    env: Mapping[str, str] = field(default_factory=dict)


@runtime_checkable
class RankGroups(Protocol):
    """A client's local training spread over several ranks. The worker builds the group once
    (and again if a failed rank closed it) and passes it to client_step as `ctx.group`.
    Without it, or when it returns None: `ctx.group` is None."""

    def rank_group(self) -> RankGroupSpec | None: ...


@runtime_checkable
class ClientCosts(Protocol):
    """Relative work of one client step, for `runtime.assignment: balanced`. Without it:
    every client costs the same."""

    def client_cost(self, client_id: int) -> float: ...


@runtime_checkable
class DownloadSize(Protocol):
    """Bytes a client receives of a broadcast, when it is not all of `msg.tensors` (e.g. a
    rank-truncated adapter). Without it: `tensors_nbytes(msg.tensors)`."""

    def bytes_down(self, msg: Broadcast, client_id: int) -> int: ...


@runtime_checkable
class CheckpointState(Protocol):
    """A server state that is not itself a flat dict of tensors. Without it, the state is
    saved and loaded as it is."""

    def state_tensors(self, state: Any) -> Tensors: ...

    def load_state_tensors(self, tensors: Tensors) -> Any: ...


@runtime_checkable
class RoundMetrics(Protocol):
    """Numbers the round's fold yields besides the new state (e.g. per-client contribution
    scores), computed from the fold itself and written into the round's record."""

    def round_metrics(self, acc: Any) -> dict[str, Any]: ...


@runtime_checkable
class FinalOutputs(Protocol):
    """Files written into the run directory at the end (e.g. the adapter and its base)."""

    def save_final(self, state: Any, run_dir: Any) -> None: ...


@runtime_checkable
class RunSummary(Protocol):
    """Entries added to summary.json, computed from the run's records."""

    def summary_extra(self, history: list[dict]) -> dict[str, Any]: ...


@runtime_checkable
class DataPartition(Protocol):
    """Its clients hold the rows the data layer gives them: `partition_record()` (rows per
    client, a hash of the row ids) is written to the run directory as partition.json, and
    `datasets()` names the data.dataset values it can train on. Without it: no
    partition.json, and a data.dataset other than digits is a config error."""

    def partition_record(self) -> dict[str, Any]: ...

    def datasets(self) -> tuple[str, ...]: ...


@runtime_checkable
class ConfigProblems(Protocol):
    """Combinations of settings this algorithm cannot honour, beyond the ones the optional
    groups above cover; each problem names its key. Checked before anything runs."""

    def config_problems(self) -> list[str]: ...


def bytes_down(algorithm: Any, msg: Broadcast, client_id: int) -> int:
    if isinstance(algorithm, DownloadSize):
        return algorithm.bytes_down(msg, client_id)
    return tensors_nbytes(msg.tensors)


def rank_group_spec(algorithm: Any) -> RankGroupSpec | None:
    return algorithm.rank_group() if isinstance(algorithm, RankGroups) else None


def client_cost(algorithm: Any, client_id: int) -> float:
    return algorithm.client_cost(client_id) if isinstance(algorithm, ClientCosts) else 1.0


def state_tensors(algorithm: Any, state: Any) -> Tensors:
    return algorithm.state_tensors(state) if isinstance(algorithm, CheckpointState) else state


def load_state_tensors(algorithm: Any, tensors: Tensors) -> Any:
    return algorithm.load_state_tensors(tensors) if isinstance(algorithm, CheckpointState) else tensors


def tensors_nbytes(tensors: Mapping[str, torch.Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())
