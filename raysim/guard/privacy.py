"""Client-level differential privacy (DP-FedAvg with the Gaussian mechanism).

API
---
``clip_update(update, clip_norm) -> Tensors``
    scale a client's update to global L2 norm <= ``clip_norm`` (done by the client, or by the
    worker before folding): this bounds what one client can change in the SUM.
``add_gaussian_noise(summed, clip_norm, noise_multiplier, generator) -> Tensors``
    add N(0, (noise_multiplier * clip_norm)^2) to every coordinate of the SUM of clipped
    updates (once per round, in the driver); ``generator`` is a ``torch.Generator``
    (raysim seeds it from the OS's CSPRNG each round, never from the run's seed: noise that
    could be regenerated from config.yaml or a checkpoint could be subtracted).
``DPAccountant(noise_multiplier, sample_rate, delta)``
    ``step()`` once per aggregated round; ``epsilon()`` = epsilon spent so far at ``delta``;
    ``to_dict()`` / ``DPAccountant.from_dict(d)`` for checkpoints.
``noise_for_target_epsilon(target_epsilon, delta, sample_rate, rounds) -> float``
    smallest noise multiplier whose epsilon after ``rounds`` rounds is <= ``target_epsilon``.

How the pieces fit (McMahan et al. 2018, "Learning differentially private recurrent language
models"): each sampled client clips its update to ``clip_norm``; the driver sums the clipped
updates with weight 1 (or any weights <= 1: the sensitivity of the sum must stay ``clip_norm``),
adds noise with ``add_gaussian_noise`` and divides by a FIXED denominator (the expected cohort
size, ``clients_per_round``), never by the realised count, which would itself leak. The
privacy unit is a whole client; a client's example count must not be used as its weight.

Accounting uses Google's maintained ``dp-accounting`` library (RDP accountant, event
``PoissonSampledDpEvent(q, GaussianDpEvent(noise_multiplier))`` per round, add-or-remove-one
neighbouring relation), never a hand-rolled formula. ``q = clients_per_round / total_clients``.
raysim samples a fixed-size cohort without replacement; treating it as Poisson sampling at
the same rate is the usual DP-FedAvg approximation, and the reported epsilon is for that
model.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import dp_accounting
import torch
from dp_accounting import rdp

from raysim.aggregate.robust import clip_by_norm

Tensors = dict[str, torch.Tensor]


def clip_update(update: Tensors, clip_norm: float) -> Tensors:
    """``update`` scaled to global L2 norm <= ``clip_norm`` (new tensors, dtypes kept)."""
    return clip_by_norm(update, clip_norm)


def add_gaussian_noise(
    summed: Tensors, clip_norm: float, noise_multiplier: float, generator: torch.Generator
) -> Tensors:
    """``summed`` plus i.i.d. Gaussian noise of std ``noise_multiplier * clip_norm`` per coordinate.

    Noise is drawn in float64, in sorted key order, so the same generator state gives the same
    noise whatever order the dict was built in; results keep each input tensor's dtype.
    """
    if clip_norm <= 0 or noise_multiplier < 0:
        raise ValueError(f"need clip_norm > 0 and noise_multiplier >= 0, got {clip_norm}, {noise_multiplier}")
    std = float(noise_multiplier) * float(clip_norm)
    out: Tensors = {}
    for k in sorted(summed):
        t = summed[k].detach()
        noise = torch.randn(t.shape, generator=generator, dtype=torch.float64)
        out[k] = (t.to(torch.float64) + std * noise).to(t.dtype)
    return {k: out[k] for k in summed}  # keep the caller's key order


# --------------------------------------------------------------------------- accounting


def _round_event(noise_multiplier: float, sample_rate: float) -> dp_accounting.DpEvent:
    return dp_accounting.PoissonSampledDpEvent(sample_rate, dp_accounting.GaussianDpEvent(noise_multiplier))


@functools.lru_cache(maxsize=1024)
def _epsilon(noise_multiplier: float, sample_rate: float, delta: float, steps: int) -> float:
    # ~0.1-0.6 s per call (the library evaluates the RDP curve at ~150 orders, some by series
    # expansion), so repeated queries for the same state are cached.
    if steps == 0:
        return 0.0
    acc = rdp.RdpAccountant()  # default orders and ADD_OR_REMOVE_ONE
    acc.compose(_round_event(noise_multiplier, sample_rate), count=steps)
    return float(acc.get_epsilon(delta))


def _check(noise_multiplier: float, sample_rate: float, delta: float) -> None:
    if not noise_multiplier >= 0:
        raise ValueError(f"noise_multiplier must be >= 0, got {noise_multiplier}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")


@dataclass
class DPAccountant:
    """Privacy spent by ``steps`` rounds of the sampled Gaussian mechanism.

    The state is just the step count; epsilon is recomputed by the library from scratch
    (cheap: RDP composition of identical rounds is a multiplication), so a restored
    accountant reports exactly what the original did.
    """

    noise_multiplier: float
    sample_rate: float
    delta: float
    steps: int = 0

    def __post_init__(self) -> None:
        _check(self.noise_multiplier, self.sample_rate, self.delta)
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}")

    def step(self, count: int = 1) -> None:
        """Record ``count`` aggregated rounds (call after each round that used the noisy sum)."""
        if count < 0:
            raise ValueError(f"count must be >= 0, got {count}")
        self.steps += int(count)

    def epsilon(self) -> float:
        """Epsilon spent so far at ``delta`` (``inf`` if noise_multiplier is 0)."""
        return _epsilon(float(self.noise_multiplier), float(self.sample_rate), float(self.delta), int(self.steps))

    def to_dict(self) -> dict:
        return {
            "noise_multiplier": float(self.noise_multiplier),
            "sample_rate": float(self.sample_rate),
            "delta": float(self.delta),
            "steps": int(self.steps),
        }

    @classmethod
    def from_dict(cls, d: dict) -> DPAccountant:
        return cls(float(d["noise_multiplier"]), float(d["sample_rate"]), float(d["delta"]), int(d["steps"]))


def noise_for_target_epsilon(target_epsilon: float, delta: float, sample_rate: float, rounds: int) -> float:
    """Smallest noise multiplier with epsilon(rounds) <= ``target_epsilon``, via the library's calibration.

    ``dp_accounting.calibrate_dp_mechanism`` brackets and root-finds (Brent) on the noise
    multiplier with the same accountant and event as ``DPAccountant``, and guarantees the
    returned value does not exceed the budget.
    """
    _check(1.0, sample_rate, delta)
    if not target_epsilon > 0 or not math.isfinite(target_epsilon):
        raise ValueError(f"target_epsilon must be a positive finite number, got {target_epsilon}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")

    def make_event(noise_multiplier: float) -> dp_accounting.DpEvent:
        return dp_accounting.SelfComposedDpEvent(_round_event(noise_multiplier, sample_rate), rounds)

    return float(
        dp_accounting.calibrate_dp_mechanism(
            rdp.RdpAccountant,
            make_event,
            target_epsilon,
            delta,
            bracket_interval=dp_accounting.LowerEndpointAndGuess(0.0, 1.0),
            tol=1e-6,
        )
    )
