"""Contribution scores (`lora.contribution`), the incentive hook: each round, the cosine
between a client's update and the round's example-weighted mean update, the gradient-
similarity approximation of Shapley values of CGSV (Xu et al. 2021). Updates are compared
in the space the LoRA rule averages in (adapters.rule_space), through a count sketch."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from actors.protocol import Tensors


class CountSketch:
    """A linear map of a flattened adapter to `dim` numbers that keeps inner products in
    expectation (each coordinate goes to a hashed bucket with a hashed sign); exact
    (identity) when the adapter has no more than `dim` entries. Linear, so the sketch of
    an update is sketch(result) - sketch(reference)."""

    def __init__(self, template: Tensors, dim: int, seed: int):
        self.keys = sorted(template)
        self.total = sum(template[k].numel() for k in self.keys)
        self.dim = dim
        self.exact = self.total <= dim
        if not self.exact:
            gen = torch.Generator().manual_seed(seed)
            self.bucket = torch.randint(0, dim, (self.total,), generator=gen)
            self.sign = torch.randint(0, 2, (self.total,), generator=gen).float() * 2 - 1

    def __call__(self, tensors: Tensors) -> torch.Tensor:
        flat = torch.cat([tensors[k].detach().float().reshape(-1).cpu() for k in self.keys]).double()
        if self.exact:
            return flat
        return torch.zeros(self.dim, dtype=torch.float64).index_add_(0, self.bucket, flat * self.sign.double())


class Sketcher:
    """The count sketch of this run's adapters, built from the first one seen (all share keys
    and shapes) and so the same in every process, being drawn from the seed."""

    def __init__(self, dim: int, seed: int):
        self.dim, self.seed, self.sketch = dim, seed, None

    def __call__(self, tensors: Tensors) -> torch.Tensor:
        if self.sketch is None:
            self.sketch = CountSketch(tensors, self.dim, self.seed)
        return self.sketch(tensors)


@dataclass
class Sketches:
    """The contribution part of a round's fold: the sketch of what clients of each rank were
    sent, and each client's update sketch and weight."""

    references: dict[int, torch.Tensor]
    updates: dict[int, torch.Tensor] = field(default_factory=dict)
    weights: dict[int, float] = field(default_factory=dict)

    def add(self, client_id: int, rank: int, result_sketch: torch.Tensor, weight: float) -> None:
        self.updates[client_id] = result_sketch - self.references[rank]
        self.weights[client_id] = weight

    def merge(self, other: "Sketches") -> "Sketches":
        return Sketches(self.references or other.references, {**self.updates, **other.updates},
                        {**self.weights, **other.weights})


def cosine_contributions(sketches: dict[int, torch.Tensor], weights: dict[int, float]) -> dict[int, float]:
    """cos(u_i, ū) with ū the example-weighted mean update of the round."""
    total = sum(weights.values())
    mean = sum(weights[c] * sketches[c] for c in sketches) / total
    return {c: float(F.cosine_similarity(sketches[c], mean, dim=0)) for c in sorted(sketches)}


def round_scores(s: Sketches | None) -> dict:
    """The round record's entry: {"contribution": {client: score}}, or nothing."""
    if s is None or not s.updates:
        return {}
    return {"contribution": {str(c): v for c, v in cosine_contributions(s.updates, s.weights).items()}}


def run_summary(history: list[dict]) -> dict:
    """Contribution over the whole run: mean score per participation, and the ranking."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for rec in history:
        for c, s in rec.get("contribution", {}).items():
            sums[c] = sums.get(c, 0.0) + s
            counts[c] = counts.get(c, 0) + 1
    mean = {c: sums[c] / counts[c] for c in sorted(sums, key=int)}
    ranking = sorted(mean, key=lambda c: (-mean[c], int(c)))
    return {"contribution": {"mean": mean, "rounds": counts, "ranking": [int(c) for c in ranking]}} if mean else {}
