"""The exact weighted mean of client updates, as a fold.

Every aggregation is a fold: ``ws_zero`` -> ``ws_add`` (or raysim.aggregate.lora's ``product_add``) per client
-> ``ws_merge`` partials -> ``ws_mean``.  Workers pre-reduce their own clients
and the driver only merges partials, so the fold must be associative.

Sums are exact fixed-point integers (int64 multiples of 2**-FIXED_BITS): integer
addition is associative and commutative, so partials can be merged in any order, as
they arrive, and a client re-run on another worker changes nothing, bit for bit.
Each client's contribution is rounded once to 2**-32 (about 2e-10), far below float32
resolution of the values we average. Results are float32.
No Ray imports: this module is plain torch so it is trivially testable.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

Tensors = dict[str, torch.Tensor]

# --------------------------------------------------------------------------- weighted mean


FIXED_BITS = 32
_SCALE = float(2**FIXED_BITS)
_INT64_SAFE = 2.0**62  # headroom below 2**63 for the running bound


@dataclass
class WeightedSum:
    """Fold state for a weighted mean."""

    weight: float = 0.0  # total weight so far (weights are example counts: exact in float64)
    sums: dict[str, torch.Tensor] = field(default_factory=dict)  # int64 fixed-point sum of weight * tensor
    count: int = 0  # number of updates folded
    bound: float = 0.0  # sum of the largest |term| of each add: guards int64 overflow

    # Sums travel as numpy arrays, which Ray reads zero-copy from its object store: the
    # driver merges a worker's partial without holding a private copy of it. A received
    # partial is read-only (merges only read their second argument).
    def __getstate__(self):
        return {**self.__dict__, "sums": {k: t.numpy() for k, t in self.sums.items()}}

    def __setstate__(self, state):
        import warnings

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # read-only buffers, see above
            state["sums"] = {k: torch.from_numpy(a) for k, a in state["sums"].items()}
        self.__dict__.update(state)


def ws_zero() -> WeightedSum:
    return WeightedSum(0.0, {}, 0, 0.0)


def _to_fixed(key: str, values: torch.Tensor) -> tuple[torch.Tensor, float]:
    scaled = torch.round(values.detach().to(torch.float64) * _SCALE)
    peak = float(scaled.abs().max()) if scaled.numel() else 0.0
    if not peak < _INT64_SAFE:  # also catches NaN/Inf
        raise ValueError(
            f"{key!r}: |weight * value| = {peak / _SCALE:.3g} is outside the exact-sum range "
            f"(below 2**{62 - FIXED_BITS}); screen or clip updates before aggregation"
        )
    return scaled.to(torch.int64), peak


def ws_sums(acc: WeightedSum) -> Tensors:
    """The sums as float64 (for inspection and tests)."""
    return {k: s.to(torch.float64) / _SCALE for k, s in acc.sums.items()}


def _check_compatible(have: dict[str, torch.Tensor], new: dict[str, torch.Tensor]) -> None:
    if have.keys() != new.keys():
        missing, extra = sorted(have.keys() - new.keys()), sorted(new.keys() - have.keys())
        raise ValueError(f"key mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
    for k, t in new.items():
        if have[k].shape != t.shape:
            raise ValueError(f"shape mismatch for {k!r}: {tuple(have[k].shape)} vs {tuple(t.shape)}")


def ws_add(acc: WeightedSum, tensors: Tensors, weight: float) -> WeightedSum:
    """Fold ``weight * tensors`` into ``acc``.

    Updates ``acc`` IN PLACE (the fold owns it) and returns it; ``tensors`` is never
    modified or aliased (the float64 product is always a fresh tensor).
    """
    weight = float(weight)
    if weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight}")
    if acc.count:
        _check_compatible(acc.sums, tensors)
    peak = 0.0
    fixed = {}
    for k, t in tensors.items():
        fixed[k], p = _to_fixed(k, t.detach().to(torch.float64) * weight)
        peak = max(peak, p)
    if acc.bound + peak >= _INT64_SAFE:
        raise ValueError("exact-sum overflow: the folded updates are too large in magnitude; clip them first")
    if acc.count:
        for k, f in fixed.items():
            acc.sums[k].add_(f)
    else:
        acc.sums = fixed
    acc.weight += weight
    acc.count += 1
    acc.bound += peak
    return acc


def ws_merge(a: WeightedSum, b: WeightedSum) -> WeightedSum:
    """Combine two partial folds into a new one; neither input is modified."""
    if not a.count:
        a, b = b, a
    if not b.count:  # merging with an empty fold: copy so the result never aliases an input
        return WeightedSum(a.weight, {k: t.clone() for k, t in a.sums.items()}, a.count, a.bound)
    _check_compatible(a.sums, b.sums)
    if a.bound + b.bound >= _INT64_SAFE:
        raise ValueError("exact-sum overflow while merging partials; clip updates first")
    sums = {k: a.sums[k] + b.sums[k] for k in a.sums}
    return WeightedSum(a.weight + b.weight, sums, a.count + b.count, a.bound + b.bound)


def ws_merge_into(acc: WeightedSum, other: WeightedSum) -> WeightedSum:
    """Add `other` into `acc` in place (the fold owns `acc`; `other` is only read).
    The driver merges worker partials this way, so it holds one accumulator plus the
    partial being added, never a third copy."""
    if not other.count:
        return acc
    if not acc.count:
        acc.sums = {k: t.clone() for k, t in other.sums.items()}
    else:
        _check_compatible(acc.sums, other.sums)
        if acc.bound + other.bound >= _INT64_SAFE:
            raise ValueError("exact-sum overflow while merging partials; clip updates first")
        for k, t in other.sums.items():
            acc.sums[k].add_(t)
    acc.weight += other.weight
    acc.count += other.count
    acc.bound += other.bound
    return acc


def ws_mean(acc: WeightedSum, release: bool = False) -> Tensors:
    """The weighted mean as float32. `release=True` empties `acc` tensor by tensor as the
    mean is built (the driver's peak: the int64 sums, not the sums plus the mean)."""
    if acc.weight <= 0:
        raise ValueError(f"cannot take a mean with total weight {acc.weight} (count={acc.count})")
    if not release:
        return {k: _fixed_to_float32(s, _SCALE * acc.weight) for k, s in acc.sums.items()}
    mean = {}
    for k in list(acc.sums):
        mean[k] = _fixed_to_float32(acc.sums.pop(k), _SCALE * acc.weight)
    return mean


def _fixed_to_float32(s: torch.Tensor, divisor: float, chunk: int = 1 << 20) -> torch.Tensor:
    # chunked, so the driver never holds a float64 copy of a large sum next to the result
    flat, out = s.reshape(-1), torch.empty(s.numel(), dtype=torch.float32)
    for i in range(0, flat.numel(), chunk):
        out[i : i + chunk] = flat[i : i + chunk].to(torch.float64).div_(divisor)
    return out.reshape(s.shape)
