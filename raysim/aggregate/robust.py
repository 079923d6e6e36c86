"""Byzantine-robust aggregation rules and the bounded buffer they need.

API
---
Rules (pure functions over a list of updates; results are new float32 tensors):

``coordinate_median(updates) -> Tensors``
    per-coordinate median; for an even count, the mean of the two middle values.
``trimmed_mean(updates, trim_fraction) -> Tensors``
    per coordinate, drop the ``k = floor(trim_fraction * n)`` largest and ``k`` smallest values
    and average the rest; ``ValueError`` if ``2k >= n``.
``clip_by_norm(update, max_norm) -> Tensors``
    scale the whole update (global L2 norm over all keys) down to ``max_norm`` if above; keeps dtypes.
``norm_clipped_mean(updates, weights, max_norm) -> Tensors``
    weighted mean of the clipped updates.
``krum_scores(updates, f) -> list[float]``; ``multi_krum_select(updates, f, m=None) -> list[int]``
    Krum (Blanchard et al., NeurIPS 2017): the score of update i is the sum of its squared L2
    distances (over all keys) to its ``n - f - 2`` nearest other updates; ``ValueError`` unless
    ``n - f - 2 >= 1``. Multi-Krum keeps the indices of the ``m`` lowest scores (default
    ``m = n - f``; ties to the lower index), returned in ascending index order.
``multi_krum(updates, weights, f, m=None) -> Tensors``
    weighted mean of the selected updates (as FedAvg, and as Flower's Krum strategy): outliers
    are removed, not dampened. Selection never looks at the weights.
``assumed_byzantine(n, fraction) -> int``; ``krum_f(n, num_byzantine, fraction) -> int``
    the default f for ``n`` updates when a share ``fraction`` of the population is Byzantine:
    the number of attackers in a random cohort is ~Binomial(n, fraction), so f is its 95th
    percentile (a cohort holds more than f attackers with probability <= 5%), capped at
    ``n - 3`` so Krum keeps at least one neighbour. (``ceil(fraction * n)`` would be exceeded in
    about a third of the rounds at n = 10, fraction = 0.2.)
``geometric_median(updates, weights, max_iter=100, tol=1e-7, nu=1e-8) -> Tensors``
    the weighted geometric median (argmin_z sum_i w_i ||z - x_i||, all keys as one vector) by the
    smoothed Weiszfeld iteration of RFA (Pillutla et al. 2022), started at the weighted mean;
    stops when a step moves z by less than ``tol * (1 + ||z||)``. Breakdown point: half the weight.
``cosine_filter_select(updates, threshold=0.0) -> list[int]``; ``cosine_filter_clip(updates, weights, threshold=0.0) -> Tensors``
    the filter-then-clip part of FLAME (Nguyen et al., USENIX Security 2022) with its HDBSCAN
    clustering of pairwise cosine distances replaced by a simpler test: keep update i if its
    cosine similarity to the coordinate-wise median of the OTHER updates is above ``threshold``
    (a zero vector has similarity 0; indices in ascending order; a single update is kept), so a
    sign-flipped update is removed whatever its norm. Leave-one-out because a median that
    includes an update leans towards it: on the quickstart workload (near-orthogonal honest
    LoRA updates) updates sign-flipped and scaled by 10 had cosine -0.03..+0.46 to the median
    of all updates, no lower than many honest ones, and mostly negative to the median of the
    others. Then clip each kept update to the median L2 norm of
    ALL the round's updates (FLAME's adaptive bound: no tuned constant, and with fewer than half
    attackers it is an honest client's norm), and take the weighted mean of the kept, clipped
    updates. Selection never looks at the weights. If nothing is kept, the result is all zeros:
    the model does not move this round. FLAME's final Gaussian noise (its DP step) is left out.
``norm_screen_select(updates, max_ratio) -> list[int]``
    a pre-screen that composes with any rule: keep update i unless its L2 norm (all keys) exceeds
    ``max_ratio`` times the median norm of the round's updates (norm-outlier rejection, as in the
    norm-bound defence of Sun et al. 2019, "Can you really backdoor federated learning?", with
    FLAME's median norm as the reference instead of a fixed bound). ``max_ratio >= 1``, so every
    update at or below the median is kept and the result is never empty. An attacker who knows the
    ratio can scale to just under it: the screen bounds the scale, not the direction.
``leave_one_out_medians(updates) -> Tensor``
    row i is the coordinate-wise median of all updates but i, flattened, from a single sort.
``robust_aggregate(buf, rule, trim_fraction=..., max_norm=..., num_byzantine=..., byzantine_fraction=..., cosine_threshold=...) -> Tensors``
    apply a rule by name (``RULES``; ``"mean"`` is the plain weighted mean) to a buffer.
``buffer_subset(buf, keep) -> BoundedBuffer``
    a new buffer with only the entries at indices ``keep`` (e.g. after ``norm_screen_select``).

Median and trimmed mean ignore weights on purpose: a weight is whatever the client claims
(e.g. its example count), so a hostile client could otherwise buy influence. Multi-Krum selects
without weights, then weights the kept updates; the geometric median's breakdown point is in
claimed weight -- pair it with a cap on claimed example counts if clients may lie about them.

These rules are NOT folds: a median cannot be computed from partial medians. The caller keeps
the round's updates in a ``BoundedBuffer`` of capacity ``clients_per_round`` (so driver memory
stays bounded by the cohort size, not the population) with the same zero/add/merge shape as
``raysim.aggregate``:

``buffer_zero(capacity)``; ``buffer_add(buf, update, weight, client_id)`` (in place, like
``ws_add``); ``buffer_merge(a, b)`` (new buffer). Both raise ``OverflowError`` past capacity and
``ValueError`` on a duplicate client id (a re-queued client must never count twice). Entries
are kept sorted by client id, so the buffer -- and every rule applied to it -- does not depend
on the order in which workers or clients arrived. ``buffer_updates(buf)`` returns
``(ids, updates, weights)`` in that order.

All arithmetic is float64; inputs are never mutated or aliased.
"""

from __future__ import annotations

import bisect
import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch


Tensors = dict[str, torch.Tensor]


def global_norm(update: Tensors) -> float:
    """L2 norm of every element of every tensor, accumulated in float64.

    float64 matters: a float32 sum of squares of a large adapter can overflow to inf
    (or lose the small entries) and reject a legitimate update.
    """
    total = 0.0
    for t in update.values():
        total += float(t.detach().to(torch.float64).square().sum())
    return math.sqrt(total)


def _check_same_layout(updates: Sequence[Tensors]) -> None:
    if not updates:
        raise ValueError("need at least one update")
    ref = updates[0]
    for i, u in enumerate(updates[1:], 1):
        if u.keys() != ref.keys():
            missing, extra = sorted(ref.keys() - u.keys()), sorted(u.keys() - ref.keys())
            raise ValueError(f"update {i}: key mismatch: missing {missing[:5]}, unexpected {extra[:5]}")
        for k, t in u.items():
            if t.shape != ref[k].shape:
                raise ValueError(f"update {i}: shape mismatch for {k!r}: {tuple(t.shape)} vs {tuple(ref[k].shape)}")


def _stacked(updates: Sequence[Tensors], key: str) -> torch.Tensor:
    # (n, *shape) float64; sorting a fresh stack never touches the inputs
    return torch.stack([u[key].detach().to(torch.float64) for u in updates])


# --------------------------------------------------------------------------- rules


def coordinate_median(updates: Sequence[Tensors]) -> Tensors:
    """Per-coordinate median. With an even count, the mean of the two middle values.

    (``torch.median`` returns the lower middle value, which biases the result downwards.)
    """
    _check_same_layout(updates)
    n = len(updates)
    out: Tensors = {}
    for k in updates[0]:
        s = _stacked(updates, k).sort(dim=0).values
        mid = s[n // 2] if n % 2 else (s[n // 2 - 1] + s[n // 2]) / 2
        out[k] = mid.to(torch.float32)
    return out


def trimmed_mean(updates: Sequence[Tensors], trim_fraction: float) -> Tensors:
    """Per coordinate: drop the k largest and k smallest values, k = floor(trim_fraction * n), then mean."""
    _check_same_layout(updates)
    n = len(updates)
    if not 0 <= trim_fraction < 0.5:
        raise ValueError(f"trim_fraction must be in [0, 0.5), got {trim_fraction}")
    k = math.floor(trim_fraction * n)
    if 2 * k >= n:
        raise ValueError(f"trimming {k} from each end of {n} updates leaves nothing")
    out: Tensors = {}
    for key in updates[0]:
        s = _stacked(updates, key).sort(dim=0).values
        out[key] = s[k : n - k].mean(dim=0).to(torch.float32)
    return out


def _clip_scale(update: Tensors, max_norm: float) -> float:
    norm = global_norm(update)
    if not math.isfinite(norm):
        raise ValueError(f"cannot clip an update with norm {norm}: screen out NaN/Inf first")
    return 1.0 if norm <= max_norm else max_norm / norm


def clip_by_norm(update: Tensors, max_norm: float) -> Tensors:
    """Scale ``update`` so its global L2 norm is at most ``max_norm``; returns new tensors, dtypes kept.

    One factor for all keys (not per tensor) so the update's direction is preserved.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    scale = _clip_scale(update, max_norm)
    return {k: (t.detach().to(torch.float64) * scale).to(t.dtype) for k, t in update.items()}


def norm_clipped_mean(updates: Sequence[Tensors], weights: Sequence[float], max_norm: float) -> Tensors:
    """Weighted mean of ``clip_by_norm(u, max_norm)``: one client moves the mean by at most max_norm * w_i / sum(w)."""
    _check_same_layout(updates)
    if len(weights) != len(updates):
        raise ValueError(f"{len(updates)} updates but {len(weights)} weights")
    weights = [float(w) for w in weights]
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be >= 0 with a positive sum, got {weights}")
    if not max_norm > 0:
        raise ValueError(f"max_norm must be > 0, got {max_norm}")
    total = sum(weights)
    factors = [w * _clip_scale(u, max_norm) for u, w in zip(updates, weights)]
    out: Tensors = {}
    for k in updates[0]:
        acc = torch.zeros(updates[0][k].shape, dtype=torch.float64)
        for u, f in zip(updates, factors):
            acc += u[k].detach().to(torch.float64) * f
        out[k] = (acc / total).to(torch.float32)
    return out


# --------------------------------------------------------------------------- bounded buffer


@dataclass
class BoundedBuffer:
    """Fold state for non-fold rules: at most ``capacity`` (client_id, update, weight) entries, sorted by id."""

    capacity: int
    entries: list[tuple[str, Tensors, float]] = field(default_factory=list)


def buffer_zero(capacity: int) -> BoundedBuffer:
    if capacity < 1:
        raise ValueError(f"capacity must be >= 1, got {capacity}")
    return BoundedBuffer(int(capacity), [])


def buffer_add(buf: BoundedBuffer, update: Tensors, weight: float, client_id) -> BoundedBuffer:
    """Insert a copy of ``update`` in id order. Updates ``buf`` IN PLACE (the fold owns it) and returns it."""
    cid = str(client_id)
    weight = float(weight)
    if weight < 0:
        raise ValueError(f"weight must be >= 0, got {weight}")
    ids = [e[0] for e in buf.entries]
    i = bisect.bisect_left(ids, cid)
    if i < len(ids) and ids[i] == cid:
        raise ValueError(f"client {cid!r} is already in the buffer")
    if len(ids) >= buf.capacity:
        raise OverflowError(f"buffer is full ({buf.capacity} updates); cannot add client {cid!r}")
    if buf.entries:
        _check_same_layout([buf.entries[0][1], update])
    # copy: the caller may reuse or train its tensors further; the buffer must not change with them
    buf.entries.insert(i, (cid, {k: t.detach().clone() for k, t in update.items()}, weight))
    return buf


def buffer_merge(a: BoundedBuffer, b: BoundedBuffer) -> BoundedBuffer:
    """Combine two partial buffers into a new one (entries shared, not copied; neither input is modified)."""
    if a.capacity != b.capacity:
        raise ValueError(f"cannot merge buffers of capacity {a.capacity} and {b.capacity}")
    if len(a.entries) + len(b.entries) > a.capacity:
        raise OverflowError(f"merged buffer would hold {len(a.entries) + len(b.entries)} > {a.capacity} updates")
    dup = {e[0] for e in a.entries} & {e[0] for e in b.entries}
    if dup:
        raise ValueError(f"clients in both partials: {sorted(dup)[:5]}")
    if a.entries and b.entries:
        _check_same_layout([a.entries[0][1], b.entries[0][1]])
    return BoundedBuffer(a.capacity, sorted(a.entries + b.entries, key=lambda e: e[0]))


def buffer_updates(buf: BoundedBuffer) -> tuple[list[str], list[Tensors], list[float]]:
    """``(client_ids, updates, weights)`` in client-id order."""
    return [e[0] for e in buf.entries], [e[1] for e in buf.entries], [e[2] for e in buf.entries]


def buffer_subset(buf: BoundedBuffer, keep: Sequence[int]) -> BoundedBuffer:
    """A new buffer with the entries at indices ``keep`` (entries shared, not copied)."""
    return BoundedBuffer(buf.capacity, [buf.entries[i] for i in sorted(set(keep))])


def _flat(updates: Sequence[Tensors]) -> torch.Tensor:
    # (n, d) float64: every key of an update as one vector, keys in the first update's order
    keys = list(updates[0])
    return torch.stack([torch.cat([u[k].detach().to(torch.float64).reshape(-1) for k in keys]) for u in updates])


def _unflat(vec: torch.Tensor, like: Tensors) -> Tensors:
    out: Tensors = {}
    i = 0
    for k, t in like.items():
        out[k] = vec[i : i + t.numel()].reshape(t.shape).to(torch.float32)
        i += t.numel()
    return out


def _check_weights(weights: Sequence[float], n: int) -> list[float]:
    if len(weights) != n:
        raise ValueError(f"{n} updates but {len(weights)} weights")
    weights = [float(w) for w in weights]
    if any(not (w >= 0 and math.isfinite(w)) for w in weights) or sum(weights) <= 0:
        raise ValueError(f"weights must be finite and >= 0 with a positive sum, got {weights}")
    return weights


def krum_scores(updates: Sequence[Tensors], f: int) -> list[float]:
    """Score of each update: sum of squared distances to its ``n - f - 2`` nearest other updates."""
    _check_same_layout(updates)
    n = len(updates)
    k = n - int(f) - 2
    if f < 0 or k < 1:
        raise ValueError(f"Krum needs n - f - 2 >= 1 neighbours; got n={n}, f={f}")
    x = _flat(updates)
    # row by row (memory n*d, not n*n*d); differences, not a Gram matrix, so no cancellation
    d2 = torch.stack([((x - x[i]) ** 2).sum(dim=1) for i in range(n)])
    scores = []
    for i in range(n):
        others = torch.cat([d2[i, :i], d2[i, i + 1 :]]).sort().values
        scores.append(float(others[:k].sum()))
    return scores


def multi_krum_select(updates: Sequence[Tensors], f: int, m: int | None = None) -> list[int]:
    """Indices (ascending) of the ``m`` updates with the lowest Krum scores; ``m = n - f`` by default."""
    scores = krum_scores(updates, f)
    n = len(updates)
    m = n - int(f) if m is None else int(m)
    if not 1 <= m <= n:
        raise ValueError(f"multi-krum must keep 1..{n} updates, got m={m}")
    order = sorted(range(n), key=lambda i: (scores[i], i))
    return sorted(order[:m])


def multi_krum(updates: Sequence[Tensors], weights: Sequence[float], f: int, m: int | None = None) -> Tensors:
    """Weighted mean of the updates Multi-Krum keeps (the rest are dropped entirely)."""
    weights = _check_weights(weights, len(updates))
    keep = multi_krum_select(updates, f, m)
    total = sum(weights[i] for i in keep)
    if total <= 0:
        raise ValueError("every update multi-krum kept has weight 0")
    out: Tensors = {}
    for key in updates[0]:
        acc = torch.zeros(updates[0][key].shape, dtype=torch.float64)
        for i in keep:
            acc += updates[i][key].detach().to(torch.float64) * weights[i]
        out[key] = (acc / total).to(torch.float32)
    return out


def assumed_byzantine(n: int, fraction: float) -> int:
    """Default f: 95th percentile of Binomial(n, fraction), capped at n - 3 (and at 0 below)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}")
    if n < 1:
        raise ValueError(f"need n >= 1, got {n}")
    f, cdf = 0, 0.0
    for f in range(n + 1):
        cdf += math.comb(n, f) * fraction**f * (1 - fraction) ** (n - f)
        if cdf >= 0.95 - 1e-12:
            break
    return max(0, min(f, n - 3))


def krum_f(n: int, num_byzantine: int | None, byzantine_fraction: float) -> int:
    """The f ``robust_aggregate`` uses for ``n`` updates (n >= 3): ``num_byzantine`` or the default, capped at n - 3."""
    f = assumed_byzantine(n, byzantine_fraction) if num_byzantine is None else int(num_byzantine)
    return max(0, min(f, n - 3))


def geometric_median(
    updates: Sequence[Tensors],
    weights: Sequence[float],
    max_iter: int = 100,
    tol: float = 1e-7,
    nu: float = 1e-8,
) -> Tensors:
    """Weighted geometric median by smoothed Weiszfeld: z <- sum b_i x_i / sum b_i, b_i = w_i / max(nu, ||z - x_i||)."""
    _check_same_layout(updates)
    w = torch.tensor(_check_weights(weights, len(updates)), dtype=torch.float64)
    x = _flat(updates)
    z = (w[:, None] * x).sum(0) / w.sum()
    for _ in range(max_iter):
        beta = w / (x - z).norm(dim=1).clamp_min(nu)
        z_new = (beta[:, None] * x).sum(0) / beta.sum()
        step = float((z_new - z).norm())
        z = z_new
        if step <= tol * (1.0 + float(z.norm())):
            break
    return _unflat(z, updates[0])


def norm_screen_select(updates: Sequence[Tensors], max_ratio: float) -> list[int]:
    """Indices (ascending) of the updates whose L2 norm is at most ``max_ratio`` x the median norm."""
    _check_same_layout(updates)
    if not max_ratio >= 1:
        raise ValueError(f"max_ratio must be >= 1 (or everything above the median goes), got {max_ratio}")
    norms = [global_norm(u) for u in updates]
    if not all(math.isfinite(v) for v in norms):
        raise ValueError("an update has a NaN/Inf norm: screen out NaN/Inf first")
    bound = max_ratio * statistics.median(norms)
    return [i for i, v in enumerate(norms) if v <= bound]


def leave_one_out_medians(updates: Sequence[Tensors]) -> torch.Tensor:
    """Row i: the coordinate-wise median of all updates but i, flattened (n, d) float64; needs n >= 2.

    One sort: with the values of a coordinate sorted, dropping the value of rank r shifts every
    later position down by one, so the remaining middle value(s) are read at j or j + 1.
    """
    _check_same_layout(updates)
    x = _flat(updates)
    n = x.shape[0]
    if n < 2:
        raise ValueError("a leave-one-out median needs at least 2 updates")
    s, order = x.sort(dim=0)
    rank = torch.empty_like(order)
    rank.scatter_(0, order, torch.arange(n).unsqueeze(1).expand_as(order))
    m = n - 1
    mids = [(m - 1) // 2] if m % 2 else [m // 2 - 1, m // 2]

    def at(j: int) -> torch.Tensor:  # (n, d): position j of each row's remaining sorted values
        return torch.where(rank > j, s[j].expand_as(s), s[j + 1].expand_as(s))

    return sum(at(j) for j in mids) / len(mids)


def cosine_filter_select(updates: Sequence[Tensors], threshold: float = 0.0) -> list[int]:
    """Indices (ascending) of the updates whose cosine similarity to the median of the OTHER updates exceeds ``threshold``."""
    _check_same_layout(updates)
    if not -1.0 <= threshold < 1.0:
        raise ValueError(f"cosine threshold must be in [-1, 1), got {threshold}")
    if len(updates) == 1:
        return [0]  # nothing to compare with
    x = _flat(updates)
    ref = leave_one_out_medians(updates)
    denom = x.norm(dim=1) * ref.norm(dim=1)
    dots = (x * ref).sum(dim=1)
    cos = torch.where(denom > 0, dots / denom.clamp_min(1e-300), torch.zeros_like(denom))
    return [i for i in range(len(updates)) if float(cos[i]) > threshold]


def cosine_filter_clip(updates: Sequence[Tensors], weights: Sequence[float], threshold: float = 0.0) -> Tensors:
    """Weighted mean of the kept updates (``cosine_filter_select``), each clipped to the median norm of all updates."""
    weights = _check_weights(weights, len(updates))
    _check_same_layout(updates)
    norms = [global_norm(u) for u in updates]
    if not all(math.isfinite(v) for v in norms):
        raise ValueError("an update has a NaN/Inf norm: screen out NaN/Inf first")
    keep = cosine_filter_select(updates, threshold)
    bound = statistics.median(norms)
    total = sum(weights[i] for i in keep)
    out: Tensors = {}
    if not keep or total <= 0 or bound <= 0:
        return {k: torch.zeros(t.shape, dtype=torch.float32) for k, t in updates[0].items()}
    factors = {i: weights[i] * _clip_scale(updates[i], bound) for i in keep}
    for key in updates[0]:
        acc = torch.zeros(updates[0][key].shape, dtype=torch.float64)
        for i, f in factors.items():
            acc += updates[i][key].detach().to(torch.float64) * f
        out[key] = (acc / total).to(torch.float32)
    return out


RULES = ("mean", "median", "trimmed_mean", "norm_clip", "multi_krum", "geometric_median", "cosine_filter_clip")


def robust_aggregate(
    buf: BoundedBuffer,
    rule: str,
    *,
    trim_fraction: float = 0.1,
    max_norm: float | None = None,
    num_byzantine: int | None = None,
    byzantine_fraction: float = 0.2,
    cosine_threshold: float = 0.0,
) -> Tensors:
    """Apply the rule named ``rule`` to the buffer's updates.

    multi_krum: f = ``num_byzantine`` if given, else ``assumed_byzantine(n, byzantine_fraction)``;
    either way capped at ``n - 3`` (fewer updates than planned arrive when some are rejected),
    and with fewer than 3 updates there are no neighbours to score: their weighted mean is used.
    """
    _, updates, weights = buffer_updates(buf)
    if rule == "mean":  # e.g. after a norm screen
        return norm_clipped_mean(updates, weights, math.inf)
    if rule == "multi_krum":
        if len(updates) < 3:
            return norm_clipped_mean(updates, weights, math.inf)
        return multi_krum(updates, weights, krum_f(len(updates), num_byzantine, byzantine_fraction))
    if rule == "geometric_median":
        return geometric_median(updates, weights)
    if rule == "cosine_filter_clip":
        return cosine_filter_clip(updates, weights, cosine_threshold)
    if rule == "median":
        return coordinate_median(updates)
    if rule == "trimmed_mean":
        return trimmed_mean(updates, trim_fraction)
    if rule == "norm_clip":
        if max_norm is None:
            raise ValueError("rule 'norm_clip' needs max_norm")
        return norm_clipped_mean(updates, weights, max_norm)
    raise ValueError(f"unknown robust rule {rule!r}; choose from {RULES}")
