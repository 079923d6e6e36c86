"""The guard's folds, one object per mode, chosen once for a run by `fold_for`:

- `InnerFold`: the algorithm's own fold (robust.rule mean, no privacy);
- `RobustFold`: a bounded buffer of updates and a robust rule (rules such as the median are
  not folds; the buffer holds at most clients.per_round updates);
- `DPFold`: the exact sum of clipped updates, Gaussian noise once per round;
- `SecAggFold`: the wrapping sum of masked updates; keys are advertised before the clients
  run, and the masks of clients whose update was not summed are recovered after.

Each has `client_tensors` (on the worker: what leaves the client), `zero` / `add` / `merge`,
`prepare` (before the clients run) and `finalize`, which returns a `FoldOutcome`: what the
engine needs from a round's fold comes back from it, never through attributes. `call(fn,
client_ids, *args)` runs `fn` where each client runs (the pool's `client_call`), so no fold
needs Ray.
"""
from __future__ import annotations

import dataclasses
import secrets
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Callable

import numpy as np
import torch

from actors.protocol import Broadcast, ClientResult, RoundMetrics, Tensors
from raysim.aggregate import weighted as agg
from raysim.config import ExperimentConfig
from raysim.aggregate import robust

ClientCall = Callable[..., dict[int, Any]]


@dataclass(frozen=True)
class RoundFacts:
    """What the runtime knows of a round when its fold is finalized."""

    round: int
    msg: Broadcast  # as prepared for the clients
    accepted: list[int]  # results kept (rejected ones included)
    late: list[int]  # sampled, never summed (deadline, over-selection)
    rejected: dict[int, str]  # screened out on their worker: client -> reason
    weight: float  # total weight (examples) of the results folded


@dataclass(frozen=True)
class FoldOutcome:
    state: Any
    rejected: dict[int, str] = field(default_factory=dict)  # found only at finalize (norm ratio)
    metrics: dict[str, Any] = field(default_factory=dict)  # into the round's record


def apply_delta(state: Tensors, delta: Tensors) -> Tensors:
    return {k: (state[k].double() + delta[k].double()).float() if k in delta else state[k] for k in state}


def _rule_clip(cfg: ExperimentConfig) -> float | None:
    """robust.rule norm_clip under DP or SecAgg: the client clips before noise or masking."""
    return cfg.robust.clip_norm if cfg.robust.rule == "norm_clip" else None


class InnerFold:
    """The algorithm's own fold; screening (in the guard) still applies."""

    def __init__(self, inner):
        self.inner = inner

    def client_tensors(self, ctx, msg: Broadcast, tensors: Tensors, update: Tensors, weight: float) -> Tensors:
        return tensors

    def zero(self, msg: Broadcast):
        return self.inner.zero(msg)

    def add(self, acc, result: ClientResult):
        return self.inner.accumulate(acc, result)

    def merge(self, a, b):
        return self.inner.merge(a, b)

    def prepare(self, msg: Broadcast, client_ids: list[int], call: ClientCall) -> Broadcast:
        return msg

    def finalize(self, state, acc, facts: RoundFacts, call: ClientCall) -> FoldOutcome:
        # read before finalize, which may release the fold's buffers
        metrics = self.inner.round_metrics(acc) if isinstance(self.inner, RoundMetrics) else {}
        return FoldOutcome(self.inner.finalize(state, acc), metrics=metrics)

    def spent(self, round: int) -> dict[str, float]:
        return {}


class RobustFold:
    def __init__(self, cfg: ExperimentConfig):
        self.rule = cfg.robust
        self.capacity = cfg.clients.per_round

    def client_tensors(self, ctx, msg, tensors, update, weight):
        return update

    def zero(self, msg):
        return robust.buffer_zero(self.capacity)

    def add(self, buf, result):
        return robust.buffer_add(buf, result.tensors, float(result.num_examples), result.client_id)

    def merge(self, a, b):
        return robust.buffer_merge(a, b)

    def prepare(self, msg, client_ids, call):
        return msg

    def finalize(self, state, buf, facts, call) -> FoldOutcome:
        r, rejected = self.rule, {}
        if r.max_norm_ratio is not None:  # the pre-screen, before any rule
            ids, updates, _ = robust.buffer_updates(buf)
            keep = robust.norm_screen_select(updates, r.max_norm_ratio)
            for i in sorted(set(range(len(ids))) - set(keep)):
                rejected[int(ids[i])] = f"norm_ratio: above {r.max_norm_ratio} x the round's median norm"
            buf = robust.buffer_subset(buf, keep)
        delta = robust.robust_aggregate(
            buf,
            r.rule,
            trim_fraction=r.trim_fraction,
            max_norm=r.clip_norm,
            num_byzantine=r.num_byzantine,
            byzantine_fraction=r.byzantine_fraction,
            cosine_threshold=r.cosine_threshold,
        )
        return FoldOutcome(apply_delta(state, delta), rejected)

    def spent(self, round):
        return {}


def secret_generator() -> torch.Generator:
    """A generator for DP noise, seeded from the operating system's CSPRNG and held only in
    memory: noise seeded from anything in config.yaml or a checkpoint (the run's seed, the
    round) could be regenerated and subtracted, which voids the guarantee. So a DP run is
    not reproducible, by design; every other run stays so."""
    return torch.Generator().manual_seed(secrets.randbits(63))


class DPFold:
    """DP-FedAvg: clients clip, the driver adds noise to the sum and divides by the fixed
    cohort size (raysim/guard/privacy.py)."""

    def __init__(self, cfg: ExperimentConfig):
        self.privacy = cfg.privacy
        self.rule_clip = _rule_clip(cfg)
        self.per_round, self.total, self.rounds = cfg.clients.per_round, cfg.clients.total, cfg.rounds

    def client_tensors(self, ctx, msg, tensors, update, weight):
        from raysim.guard.privacy import clip_update

        if self.rule_clip is not None:
            update = robust.clip_by_norm(update, self.rule_clip)
        return clip_update(update, self.privacy.clip_norm)

    def zero(self, msg):
        return agg.ws_zero()

    def add(self, acc, result):
        return agg.ws_add(acc, result.tensors, 1.0)  # DP: every client counts the same

    def merge(self, a, b):
        return agg.ws_merge(a, b)

    def prepare(self, msg, client_ids, call):
        return msg

    def finalize(self, state, acc, facts, call) -> FoldOutcome:
        from raysim.guard.privacy import add_gaussian_noise

        noisy = add_gaussian_noise(agg.ws_sums(acc), self.privacy.clip_norm, self.noise_multiplier, secret_generator())
        delta = {k: v / self.per_round for k, v in noisy.items()}  # fixed denominator
        return FoldOutcome(apply_delta(state, delta))

    @cached_property
    def noise_multiplier(self) -> float:
        p = self.privacy
        if p.noise_multiplier is not None:
            return p.noise_multiplier
        from raysim.guard.privacy import noise_for_target_epsilon

        return noise_for_target_epsilon(p.target_epsilon, p.delta, self.per_round / self.total, self.rounds)

    def spent(self, round: int) -> dict[str, float]:
        import logging

        from raysim.guard.privacy import DPAccountant

        logging.getLogger("absl").setLevel(logging.ERROR)  # per-order convergence chatter
        acct = DPAccountant(self.noise_multiplier, self.per_round / self.total, self.privacy.delta)
        acct.step(round)
        return {"epsilon": acct.epsilon()}


class SecAggFold:
    """Pairwise masking (raysim/guard/secagg.py). Every sampled client advertises a key and
    is masked with by its peers; a client whose masked update is not summed (late, or
    rejected on its worker) leaves masks that do not cancel, so the survivors reveal those
    pair seeds and the driver removes them before decoding."""

    def __init__(self, cfg: ExperimentConfig, state_root: str):
        self.scale_bits = cfg.privacy.scale_bits
        self.rule_clip = _rule_clip(cfg)
        self.state_root = state_root  # each client's secret sits with its state

    def client_tensors(self, ctx, msg, tensors, update, weight):
        from raysim.guard import secagg
        from raysim.guard.secagg_keys import client_private_key

        if self.rule_clip is not None:
            update = robust.clip_by_norm(update, self.rule_clip)
        key = client_private_key(ctx.client_id, msg.round, msg.payload["secagg_state_root"])
        masked = secagg.masked_update(
            ctx.client_id, key, msg.payload["secagg_public"], update, msg.round, self.scale_bits, weight=weight
        )
        return {k: torch.from_numpy(v.view(np.int64)) for k, v in masked.items()}

    def zero(self, msg):
        return None

    def add(self, masked, result):
        add = {k: t.numpy().view(np.uint64) for k, t in result.tensors.items()}
        return add if masked is None else {k: masked[k] + add[k] for k in add}

    def merge(self, a, b):
        parts = [m for m in (a, b) if m is not None]
        return None if not parts else parts[0] if len(parts) == 1 else {k: parts[0][k] + parts[1][k] for k in parts[0]}

    def prepare(self, msg, client_ids, call):
        """Key advertisement: each client's public key, computed where the client runs."""
        from raysim.guard.secagg_keys import client_public_key

        public = call(client_public_key, client_ids, msg.round, self.state_root)
        return dataclasses.replace(msg, payload={**msg.payload, "secagg_public": public, "secagg_state_root": self.state_root})

    def finalize(self, state, masked, facts, call) -> FoldOutcome:
        from raysim.guard import secagg
        from raysim.guard.secagg_keys import reveal_for_dropped

        missing = sorted(set(facts.late) | set(facts.rejected))
        survivors = [c for c in facts.accepted if c not in facts.rejected]
        revealed = {}
        if missing:
            dropped = {d: facts.msg.payload["secagg_public"][d] for d in missing}
            for seeds in call(reveal_for_dropped, survivors, dropped, facts.round, self.state_root).values():
                revealed.update(seeds)
        total = secagg.unmask_sum(masked, self.scale_bits, revealed)
        return FoldOutcome(apply_delta(state, {k: v / facts.weight for k, v in total.items()}))

    def spent(self, round):
        return {}


def fold_for(cfg: ExperimentConfig, inner, state_root: str):
    p, r = cfg.privacy, cfg.robust
    if p.secure_aggregation:
        return SecAggFold(cfg, state_root)
    if p.dp:
        return DPFold(cfg)
    if r.rule != "mean" or r.max_norm_ratio is not None:
        return RobustFold(cfg)
    return InnerFold(inner)
