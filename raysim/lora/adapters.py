"""LoRA adapters on the path: which rank each client trains, what it is sent, and how the
fold combines adapters by `algorithm.lora_aggregation` (raysim/aggregate/lora.py's rules)."""
from __future__ import annotations

import torch

from actors.protocol import Tensors
from raysim.aggregate import lora as lora_agg
from raysim.aggregate import weighted as agg
from raysim.config import LoraConfig


def client_rank(lora: LoraConfig, client_id: int) -> int:
    ranks = lora.client_ranks
    return ranks[client_id % len(ranks)] if ranks else lora.r


def ranks_in_use(lora: LoraConfig) -> list[int]:
    return sorted(set(lora.client_ranks)) if lora.client_ranks else [lora.r]


def max_rank(lora: LoraConfig) -> int:
    return max(ranks_in_use(lora))


def scaling(lora: LoraConfig) -> float:
    # lora_alpha grows with the rank (alpha * r / lora.r) so every rank has the same
    # scaling alpha / lora.r and truncated or padded factors stay interchangeable.
    return lora.alpha / lora.r


def adapter_name(rank: int) -> str:
    return f"r{rank}"


def for_client(global_adapter: Tensors, rank: int, r_max: int) -> Tensors:
    """The slice of the global adapter a client of `rank` starts from (and is sent)."""
    return global_adapter if rank == r_max else lora_agg.truncate_lora(global_adapter, rank)


def rule_space(tensors: Tensors, rule: str, lora: LoraConfig) -> Tensors:
    """An adapter as the rule averages it: its factors ('factors'), its factors zero-padded to
    the largest rank ('hetlora'), or its dense products scaling * B @ A ('product')."""
    if rule == "product":
        return lora_agg.dense_products(tensors, scaling(lora))
    if rule == "hetlora":
        return lora_agg.pad_lora(tensors, max_rank(lora))
    return tensors


def fold_add(acc: agg.WeightedSum, tensors: Tensors, weight: float, rule: str, lora: LoraConfig) -> agg.WeightedSum:
    if rule == "product":
        return lora_agg.product_add(acc, tensors, weight, scaling(lora))
    return agg.ws_add(acc, rule_space(tensors, rule, lora), weight)


def fold_result(acc: agg.WeightedSum, rule: str, lora: LoraConfig) -> Tensors:
    mean = agg.ws_mean(acc)
    if rule == "product":
        return lora_agg.product_to_lora(mean, max_rank(lora), scaling(lora))
    return mean


def l2_norm(tensors: Tensors) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors.values())))
