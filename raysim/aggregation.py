"""Pure aggregation folds for federated (LoRA) updates.

Every aggregation is a fold: ``ws_zero`` -> ``ws_add``/``product_add`` per client
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

import math
from dataclasses import dataclass, field

import torch

Tensors = dict[str, torch.Tensor]

_A, _B = ".lora_A.", ".lora_B."
_DELTA = ".delta"


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


# --------------------------------------------------------------------------- LoRA key helpers


def lora_pairs(keys) -> dict[str, tuple[str, str]]:
    """Map module prefix -> (lora_A key, lora_B key).

    ``"...q_proj.lora_A.weight"`` pairs with ``"...q_proj.lora_B.weight"``; prefix is ``"...q_proj"``.
    """
    keys = set(keys)
    pairs: dict[str, tuple[str, str]] = {}
    for k in keys:
        if "lora_embedding_" in k:
            # embedding LoRA stores delta = (B @ A).T; silently treating it as plain would be wrong
            raise ValueError(f"embedding LoRA is not supported: {k!r}")
        if _A in k:
            prefix, suffix = k.split(_A, 1)
            partner = prefix + _B + suffix
        elif _B in k:
            prefix, suffix = k.split(_B, 1)
            partner = prefix + _A + suffix
        else:
            continue
        if partner not in keys:
            raise ValueError(f"unpaired LoRA key {k!r} (expected {partner!r})")
        pair = (k, partner) if _A in k else (partner, k)
        if pairs.setdefault(prefix, pair) != pair:
            raise ValueError(f"several LoRA adapters for module {prefix!r}: {pairs[prefix]} and {pair}")
    return pairs


def split_lora(tensors: Tensors) -> tuple[dict[str, tuple[torch.Tensor, torch.Tensor]], Tensors]:
    """Return ``({prefix: (A, B)}, other_tensors)``; tensors are not copied."""
    pairs = lora_pairs(tensors.keys())
    lora = {p: (tensors[a], tensors[b]) for p, (a, b) in pairs.items()}
    used = {k for ab in pairs.values() for k in ab}
    return lora, {k: t for k, t in tensors.items() if k not in used}


def lora_rank(tensors: Tensors) -> int:
    lora, _ = split_lora(tensors)
    ranks = {p: (a.shape[0], b.shape[1]) for p, (a, b) in lora.items()}
    distinct = {r for ab in ranks.values() for r in ab}
    if len(distinct) != 1:
        raise ValueError(f"expected one LoRA rank, got {ranks or 'no LoRA pairs'}")
    return distinct.pop()


def _check_2d(prefix: str, a: torch.Tensor, b: torch.Tensor) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
        raise ValueError(f"{prefix!r}: need A (r, in) and B (out, r), got {tuple(a.shape)}, {tuple(b.shape)}")


# --------------------------------------------------------------------------- "product" aggregation


def product_add(acc: WeightedSum, tensors: Tensors, weight: float, scaling: float) -> WeightedSum:
    """Fold ``weight * scaling * B @ A`` per module (key ``prefix + ".delta"``) plus plain tensors.

    Averaging the dense deltas is exact whatever each client's rank is, unlike averaging
    A and B separately (mean(B) @ mean(A) != mean(B @ A)). Updates ``acc`` in place.
    """
    lora, dense = split_lora(tensors)
    for prefix, (a, b) in lora.items():
        _check_2d(prefix, a, b)
        key = prefix + _DELTA
        if key in dense:
            raise ValueError(f"plain key {key!r} collides with a LoRA delta key")
        dense[key] = scaling * (b.detach().to(torch.float64) @ a.detach().to(torch.float64))
    return ws_add(acc, dense, weight)


def refactor(delta: torch.Tensor, rank: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Best rank-``rank`` factorization: ``scaling * B @ A`` is the truncated SVD of ``delta``.

    Returns float32 ``A`` (rank, in) and ``B`` (out, rank). sqrt(S / scaling) goes on each side so
    A and B have balanced norms. Missing rank (rank > min(out, in)) is zero padding.
    """
    if rank < 1 or scaling <= 0:
        raise ValueError(f"need rank >= 1 and scaling > 0, got rank={rank}, scaling={scaling}")
    if delta.dim() != 2:
        raise ValueError(f"delta must be 2-D, got shape {tuple(delta.shape)}")
    u, s, vh = torch.linalg.svd(delta.detach().to(torch.float64), full_matrices=False)
    k = min(rank, s.numel())
    root = (s[:k] / scaling).sqrt()
    out_dim, in_dim = delta.shape
    a = torch.zeros(rank, in_dim, dtype=torch.float64)
    b = torch.zeros(out_dim, rank, dtype=torch.float64)
    a[:k] = root[:, None] * vh[:k]
    b[:, :k] = u[:, :k] * root
    return a.to(torch.float32), b.to(torch.float32)


def product_to_lora(mean: Tensors, rank: int, scaling: float) -> Tensors:
    """Turn the mean of a product fold back into a peft state dict at ``rank``.

    ``prefix.delta`` becomes ``prefix.lora_A.weight`` / ``prefix.lora_B.weight``
    (peft's saved naming); other keys are returned as float32 copies.
    """
    out: Tensors = {}
    for k, t in mean.items():
        if k.endswith(_DELTA):
            prefix = k[: -len(_DELTA)]
            out[prefix + _A + "weight"], out[prefix + _B + "weight"] = refactor(t, rank, scaling)
        else:
            out[k] = t.detach().to(torch.float32, copy=True)
    return out


# --------------------------------------------------------------------------- "hetlora" aggregation


def pad_lora(tensors: Tensors, r_max: int) -> Tensors:
    """Zero-pad every pair to rank ``r_max``: extra rows of A, extra columns of B.

    Zero padding keeps B @ A unchanged. Returns new factor tensors; plain tensors are
    passed through uncopied (nothing here mutates them).
    """
    lora, out = split_lora(tensors)
    pairs = lora_pairs(tensors.keys())
    for prefix, (a, b) in lora.items():
        _check_2d(prefix, a, b)
        r = a.shape[0]
        if r > r_max:
            raise ValueError(f"{prefix!r}: rank {r} > r_max {r_max}")
        a_key, b_key = pairs[prefix]
        out[a_key] = torch.cat([a.detach(), a.new_zeros(r_max - r, a.shape[1])], dim=0)
        out[b_key] = torch.cat([b.detach(), b.new_zeros(b.shape[0], r_max - r)], dim=1)
    return out


def truncate_lora(tensors: Tensors, r: int) -> Tensors:
    """Keep the first ``r`` rows of A / columns of B (each client's slice of the hetlora mean).

    Factors are copied so the caller may train them in place without touching the shared mean;
    plain tensors are passed through uncopied.
    """
    lora, out = split_lora(tensors)
    pairs = lora_pairs(tensors.keys())
    for prefix, (a, b) in lora.items():
        _check_2d(prefix, a, b)
        if r > a.shape[0]:
            raise ValueError(f"{prefix!r}: cannot truncate rank {a.shape[0]} to {r}")
        a_key, b_key = pairs[prefix]
        out[a_key] = a.detach()[:r].clone()
        out[b_key] = b.detach()[:, :r].clone()
    return out


def global_norm(update: Tensors) -> float:
    """L2 norm of every element of every tensor, accumulated in float64.

    float64 matters: a float32 sum of squares of a large adapter can overflow to inf
    (or lose the small entries) and reject a legitimate update.
    """
    total = 0.0
    for t in update.values():
        total += float(t.detach().to(torch.float64).square().sum())
    return math.sqrt(total)
