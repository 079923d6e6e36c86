"""LoRA-factor aggregation: pair A/B keys, fold dense products B @ A (exact at any rank),
refactor a dense mean back into rank-r factors, and pad/truncate for heterogeneous ranks.

Plain torch, no Ray: folds build on the exact weighted sum of raysim.aggregate.weighted.
"""

from __future__ import annotations

import torch

from raysim.aggregate.weighted import Tensors, WeightedSum, ws_add

_A, _B = ".lora_A.", ".lora_B."
_DELTA = ".delta"


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


def dense_products(tensors: Tensors, scaling: float) -> Tensors:
    """``scaling * B @ A`` per module (key ``prefix + ".delta"``, float64) plus the plain tensors."""
    lora, dense = split_lora(tensors)
    for prefix, (a, b) in lora.items():
        _check_2d(prefix, a, b)
        key = prefix + _DELTA
        if key in dense:
            raise ValueError(f"plain key {key!r} collides with a LoRA delta key")
        dense[key] = scaling * (b.detach().to(torch.float64) @ a.detach().to(torch.float64))
    return dense


def product_add(acc: WeightedSum, tensors: Tensors, weight: float, scaling: float) -> WeightedSum:
    """Fold ``weight * scaling * B @ A`` per module (dense_products) plus plain tensors.

    Averaging the dense deltas is exact whatever each client's rank is, unlike averaging
    A and B separately (mean(B) @ mean(A) != mean(B @ A)). Updates ``acc`` in place.
    """
    return ws_add(acc, dense_products(tensors, scaling), weight)


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
