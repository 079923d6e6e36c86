"""What stands between client results and the global model: screening (NaN/Inf, keys,
shapes, norm bound), simulated attacks (for experiments), robust rules, client-level
DP and secure aggregation. Wraps any algorithm whose clients return tensors of the
same keys and shapes as a reference they were sent (`client_reference(msg, cid)`),
by composition: everything else is the wrapped algorithm's.

Where each step runs: attacks, screening, DP clipping and masking happen in the client
step (on the worker, before anything leaves the client); folding in the worker; noise,
robust rules and unmasking in `finalize`, in the driver.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import secrets
import time

import numpy as np
import torch

from actors.protocol import Broadcast, ClientContext, ClientResult, Tensors
from actors.state_store import ClientStateStore
from raysim import aggregation as agg
from raysim import robust, screening
from raysim.config import ExperimentConfig

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
    inner: Any = None  # the wrapped algorithm's fold (rule "mean", no privacy)
    buffer: Any = None  # robust rules: bounded buffer of updates
    sums: Any = None  # DP: exact sum of clipped updates
    masked: dict[str, np.ndarray] | None = None  # SecAgg: running masked sum (uint64)
    weight: float = 0.0
    count: int = 0
    rejected: dict[int, str] = field(default_factory=dict)


class Guarded:
    def __init__(self, inner, cfg: ExperimentConfig):
        self.inner = inner
        self.cfg = cfg
        self.byzantine = byzantine_clients(cfg)

    def __getattr__(self, name):  # everything not guarded is the wrapped algorithm's
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    @property
    def mode(self) -> str:
        p = self.cfg.privacy
        if p.secure_aggregation:
            return "secagg"
        if p.dp:
            return "dp"
        r = self.cfg.robust
        return "robust" if r.rule != "mean" or r.max_norm_ratio is not None else "mean"

    # --- client side (runs in the worker) ------------------------------------------
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
        ref = self.inner.client_reference(msg, ctx.client_id)
        tensors = self._attack(ctx.client_id, res.tensors, ref)
        update = _sub(tensors, ref) if tensors.keys() == ref.keys() else tensors
        reason = screening.check_update(update, ref, self.cfg.robust.max_update_norm)
        if reason is not None:
            return ClientResult(res.client_id, res.num_examples, {}, {**res.metrics, REJECTED: reason})
        mode = self.mode
        if mode in ("dp", "secagg") and self.cfg.robust.rule == "norm_clip":
            # the one robust rule that composes with a sum the driver cannot look into:
            # the client clips before its update is noised or masked
            update = robust.clip_by_norm(update, self.cfg.robust.clip_norm)
        if mode == "mean":
            out = tensors
        elif mode == "robust":
            out = update
        elif mode == "dp":
            from raysim.privacy import clip_update

            out = clip_update(update, self.cfg.privacy.clip_norm)
        else:
            from raysim import secagg

            peers = msg.payload["secagg_public"]
            key = client_private_key(ctx.client_id, msg.round, msg.payload["secagg_state_root"])
            masked = secagg.masked_update(
                ctx.client_id, key, peers, update, msg.round, self.cfg.privacy.scale_bits, weight=res.num_examples
            )
            out = {k: torch.from_numpy(v.view(np.int64)) for k, v in masked.items()}
        return ClientResult(res.client_id, res.num_examples, out, res.metrics)

    # --- the fold ----------------------------------------------------------------
    def zero(self, msg: Broadcast) -> GuardAcc:
        mode = self.mode
        if mode == "mean":
            return GuardAcc(inner=self.inner.zero(msg))
        if mode == "robust":
            return GuardAcc(buffer=robust.buffer_zero(self.cfg.clients.per_round))
        if mode == "dp":
            return GuardAcc(sums=agg.ws_zero())
        return GuardAcc()

    def accumulate(self, acc: GuardAcc, result: ClientResult) -> GuardAcc:
        if REJECTED in result.metrics:
            acc.rejected[result.client_id] = str(result.metrics[REJECTED])
            return acc
        mode = self.mode
        if mode == "mean":
            acc.inner = self.inner.accumulate(acc.inner, result)
        elif mode == "robust":
            robust.buffer_add(acc.buffer, result.tensors, float(result.num_examples), result.client_id)
        elif mode == "dp":
            agg.ws_add(acc.sums, result.tensors, 1.0)  # DP: every client counts the same
        else:
            add = {k: t.numpy().view(np.uint64) for k, t in result.tensors.items()}
            acc.masked = add if acc.masked is None else {k: acc.masked[k] + add[k] for k in add}
        acc.weight += result.num_examples
        acc.count += 1
        return acc

    def merge(self, a: GuardAcc, b: GuardAcc) -> GuardAcc:
        out = GuardAcc(weight=a.weight + b.weight, count=a.count + b.count, rejected={**a.rejected, **b.rejected})
        mode = self.mode
        if mode == "mean":
            out.inner = self.inner.merge(a.inner, b.inner)
        elif mode == "robust":
            out.buffer = robust.buffer_merge(a.buffer, b.buffer)
        elif mode == "dp":
            out.sums = agg.ws_merge(a.sums, b.sums)
        else:
            parts = [m for m in (a.masked, b.masked) if m is not None]
            out.masked = None if not parts else parts[0] if len(parts) == 1 else {k: parts[0][k] + parts[1][k] for k in parts[0]}
        return out

    # --- driver side ---------------------------------------------------------------
    def finalize(self, state, acc: GuardAcc, revealed=None):
        if acc.count == 0:
            return state  # every result was rejected: keep the model
        mode = self.mode
        if mode == "mean":
            return self.inner.finalize(state, acc.inner)
        if mode == "robust":
            r = self.cfg.robust
            buf = acc.buffer
            if r.max_norm_ratio is not None:  # the pre-screen, before any rule
                ids, updates, _ = robust.buffer_updates(buf)
                keep = robust.norm_screen_select(updates, r.max_norm_ratio)
                for i in sorted(set(range(len(ids))) - set(keep)):
                    # the engine reads acc.rejected after finalize: metrics and quarantine strikes
                    acc.rejected[int(ids[i])] = f"norm_ratio: above {r.max_norm_ratio} x the round's median norm"
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
        elif mode == "dp":
            from raysim.privacy import add_gaussian_noise

            p = self.cfg.privacy
            noisy = add_gaussian_noise(agg.ws_sums(acc.sums), p.clip_norm, self.noise_multiplier, secret_generator())
            delta = {k: v / self.cfg.clients.per_round for k, v in noisy.items()}  # fixed denominator
        else:
            from raysim import secagg

            total = secagg.unmask_sum(acc.masked, self.cfg.privacy.scale_bits, revealed)
            delta = {k: v / acc.weight for k, v in total.items()}
        return {k: (state[k].double() + delta[k].double()).float() if k in delta else state[k] for k in state}

    @property
    def noise_multiplier(self) -> float:
        p = self.cfg.privacy
        if p.noise_multiplier is not None:
            return p.noise_multiplier
        cached = self.__dict__.get("_noise")
        if cached is None:
            from raysim.privacy import noise_for_target_epsilon

            q = self.cfg.clients.per_round / self.cfg.clients.total
            cached = self.__dict__["_noise"] = noise_for_target_epsilon(p.target_epsilon, p.delta, q, self.cfg.rounds)
        return cached

    def epsilon(self, rounds_done: int) -> float:
        import logging

        from raysim.privacy import DPAccountant

        logging.getLogger("absl").setLevel(logging.ERROR)  # per-order convergence chatter
        p = self.cfg.privacy
        acct = DPAccountant(self.noise_multiplier, self.cfg.clients.per_round / self.cfg.clients.total, p.delta)
        acct.step(rounds_done)
        return acct.epsilon()



def secret_generator() -> torch.Generator:
    """A generator for DP noise, seeded from the operating system's CSPRNG and held only in
    memory: noise seeded from anything in config.yaml or a checkpoint (the run's seed, the
    round) could be regenerated and subtracted, which voids the guarantee. So a DP run is
    not reproducible, by design; every other run stays so."""
    return torch.Generator().manual_seed(secrets.randbits(63))


# --- SecAgg key material: a per-client secret kept with the client's own state ---

def _secret(client_id: int, state_root: str) -> bytes:
    """The client's secret, in its state directory (`<state_root>/<client>/secagg.secret`;
    a path or a URL such as s3://..., as runtime client state)."""
    return ClientStateStore(state_root).secret(client_id, "secagg.secret")


def client_private_key(client_id: int, round: int, state_root: str):
    """This round's X25519 key of a client, derived from its secret (fresh keys each round)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    material = HKDF(hashes.SHA256(), 32, salt=None, info=f"raysim-secagg-key-{round}".encode()).derive(
        _secret(client_id, state_root)
    )
    return X25519PrivateKey.from_private_bytes(material)


def client_public_key(client_id: int, round: int, state_root: str) -> bytes:
    from cryptography.hazmat.primitives import serialization

    pub = client_private_key(client_id, round, state_root).public_key()
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def reveal_for_dropped(client_id: int, dropped: dict[int, bytes], round: int, state_root: str) -> dict:
    """A surviving client's pairwise seeds with the clients that dropped, so the driver can
    remove the masks that no longer cancel (SecAgg's recovery step)."""
    from raysim import secagg

    key = client_private_key(client_id, round, state_root)
    return {(client_id, d): secagg.reveal_pair_seed(key, client_id, d, pub, round) for d, pub in dropped.items()}
