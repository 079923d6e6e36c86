"""Tensors in named groups (an encoder, a decoder per task, a VAE's modules): on the wire
flat keys "<group>/<name>", in the fold one exact weighted sum per group."""
from __future__ import annotations

from collections.abc import Collection

from raysim.aggregate import weighted
from raysim.aggregate.weighted import Tensors, WeightedSum

Groups = dict[str, Tensors]  # group name -> its tensors


def flatten(groups: Groups) -> Tensors:
    return {f"{g}/{k}": t for g, ts in groups.items() for k, t in ts.items()}


def unflatten(flat: Tensors) -> Groups:
    groups: Groups = {}
    for key, t in flat.items():
        g, k = key.split("/", 1)
        groups.setdefault(g, {})[k] = t
    return groups


def group_of(flat: Tensors, group: str) -> Tensors:
    prefix = group + "/"
    return {k[len(prefix) :]: t for k, t in flat.items() if k.startswith(prefix)}


def nbytes(flat: Tensors, groups: Collection[str]) -> int:
    """The bytes of the named groups only (what a client that needs just those is sent)."""
    return sum(t.numel() * t.element_size() for k, t in flat.items() if k.split("/", 1)[0] in groups)


def merge(a: dict[str, WeightedSum], b: dict[str, WeightedSum]) -> dict[str, WeightedSum]:
    """Per-group fold merge; a group absent on one side counts as an empty sum."""
    zero = weighted.ws_zero
    return {g: weighted.ws_merge(a.get(g, zero()), b.get(g, zero())) for g in sorted(a.keys() | b.keys())}
