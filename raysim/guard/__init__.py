"""What stands between client results and the global model: screening (NaN/Inf, keys,
shapes, norm bound), simulated faults and attacks (for experiments), robust rules,
client-level DP and secure aggregation.

`Guarded` wraps every algorithm, by composition. For an algorithm whose clients return
tensors of the same keys and shapes as a reference they were sent (`GuardableUpdates`),
it screens each result on its worker and folds it with the mode's fold (raysim/guard/folds.py,
chosen once); for any other algorithm it runs the algorithm's own fold, and the options that
need a reference are config errors (raysim/capabilities.py).

Where each step runs: attacks, screening, DP clipping and masking in the client step (on the
worker, before anything leaves the client); folding in the worker; noise, robust rules and
unmasking in `finalize`, in the driver.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from actors.protocol import (
    Broadcast,
    ClientContext,
    ClientResult,
    GuardableUpdates,
    Tensors,
    bytes_down,
    client_cost,
    rank_group_spec,
)
from raysim.config import ExperimentConfig
from raysim.guard import screening
from raysim.guard.folds import ClientCall, FoldOutcome, RoundFacts, fold_for

REJECTED = "rejected"


def byzantine_clients(cfg: ExperimentConfig) -> set[int]:
    f = cfg.faults
    n = int(round(f.byzantine_fraction * cfg.clients.total))
    rng = np.random.default_rng([cfg.seed, 0xB12A])
    return set(int(c) for c in rng.choice(cfg.clients.total, size=n, replace=False)) if n else set()


def _sub(a: Tensors, b: Tensors) -> Tensors:
    return {k: a[k].float() - b[k].float() for k in a if k in b}


@dataclass
class GuardAcc:
    fold: Any = None  # the mode's accumulator
    weight: float = 0.0
    count: int = 0
    rejected: dict[int, str] = field(default_factory=dict)


class Guarded:
    """What the workers run and the driver folds: the algorithm's client step and fold,
    guarded. The algorithm's other hooks are asked of the algorithm itself."""

    def __init__(self, inner, cfg: ExperimentConfig, state_root: str = ""):
        self.inner = inner
        self.cfg = cfg
        self.screens = isinstance(inner, GuardableUpdates)
        self.byzantine = byzantine_clients(cfg) if self.screens else set()
        self.fold = fold_for(cfg, inner, state_root)

    # --- client side (runs in the worker) ------------------------------------------
    def build_resident(self):
        return self.inner.build_resident()

    def bytes_down(self, msg: Broadcast, client_id: int) -> int:
        return bytes_down(self.inner, msg, client_id)

    def rank_group(self):
        return rank_group_spec(self.inner)

    def client_cost(self, client_id: int) -> float:
        return client_cost(self.inner, client_id)

    def _attack(self, cid: int, tensors: Tensors, ref: Tensors) -> Tensors:
        f = self.cfg.faults
        if cid in f.nan_clients:
            return {k: torch.full_like(t, float("nan")) for k, t in tensors.items()}
        if cid in self.byzantine:
            sign = -1.0 if f.attack == "sign_flip" else 1.0
            return {k: ref[k] + sign * f.attack_scale * (t - ref[k]) for k, t in tensors.items()}
        return tensors

    def client_step(self, ctx: ClientContext, msg: Broadcast) -> ClientResult:
        delay = self.cfg.faults.slow_clients.get(ctx.client_id)
        if delay:
            time.sleep(delay)  # a simulated straggler
        res = self.inner.client_step(ctx, msg)
        if not self.screens:
            return res
        ref = self.inner.client_reference(msg, ctx.client_id)
        tensors = self._attack(ctx.client_id, res.tensors, ref)
        update = _sub(tensors, ref) if tensors.keys() == ref.keys() else tensors
        reason = screening.check_update(update, ref, self.cfg.robust.max_update_norm)
        if reason is not None:
            return ClientResult(res.client_id, res.num_examples, {}, {**res.metrics, REJECTED: reason})
        out = self.fold.client_tensors(ctx, msg, tensors, update, res.num_examples)
        return ClientResult(res.client_id, res.num_examples, out, res.metrics)

    # --- the fold ----------------------------------------------------------------
    def zero(self, msg: Broadcast) -> GuardAcc:
        return GuardAcc(fold=self.fold.zero(msg))

    def accumulate(self, acc: GuardAcc, result: ClientResult) -> GuardAcc:
        if REJECTED in result.metrics:
            acc.rejected[result.client_id] = str(result.metrics[REJECTED])
            return acc
        acc.fold = self.fold.add(acc.fold, result)
        acc.weight += result.num_examples
        acc.count += 1
        return acc

    def merge(self, a: GuardAcc, b: GuardAcc) -> GuardAcc:
        return GuardAcc(
            fold=self.fold.merge(a.fold, b.fold),
            weight=a.weight + b.weight,
            count=a.count + b.count,
            rejected={**a.rejected, **b.rejected},
        )

    # --- driver side ---------------------------------------------------------------
    def prepare(self, msg: Broadcast, client_ids: list[int], call: ClientCall) -> Broadcast:
        """The round's message as the clients get it (SecAgg adds the cohort's keys)."""
        return self.fold.prepare(msg, client_ids, call)

    def finalize(self, state, acc: GuardAcc, round: int, msg: Broadcast, accepted: list[int], late: list[int],
                 call: ClientCall) -> FoldOutcome:
        """The new state, every rejection of the round (screening's and the fold's own) and
        the fold's metrics (DP's epsilon, the algorithm's round metrics)."""
        spent = self.fold.spent(round)
        if acc.count == 0:  # every result was rejected: keep the model
            return FoldOutcome(state, dict(acc.rejected), spent)
        facts = RoundFacts(round, msg, accepted, late, dict(acc.rejected), acc.weight)
        out = self.fold.finalize(state, acc.fold, facts, call)
        return FoldOutcome(out.state, {**acc.rejected, **out.rejected}, {**out.metrics, **spent})
