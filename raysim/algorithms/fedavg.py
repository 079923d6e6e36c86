"""FedAvg on LoRA adapters of a dual-encoder VLM (McMahan et al. 2017): each sampled client
trains the adapter from the global one on its own data, and the new global adapter is the
example-weighted mean of theirs.

Everything else is a setting of the one LoRA path (raysim/lora/, the `lora:` section): the
model family, the backend (torch or DeepSpeed ZeRO 0-3 over world_size ranks), data
quality, contribution scores, a locked text tower, and how adapters of (possibly
heterogeneous) ranks are averaged (`algorithm.lora_aggregation`: factors, product, hetlora).
"""
from __future__ import annotations

from actors.protocol import Tensors
from raysim.lora.path import LoraPath


class FedAvg(LoraPath):
    def server_update(self, state: Tensors, mean: Tensors) -> Tensors:
        return mean  # the round's example-weighted mean adapter is the new global one

    def datasets(self) -> tuple[str, ...]:
        return ("digits", "shapes", "local")  # any: it trains on the collated raw examples


ALGORITHM = FedAvg
