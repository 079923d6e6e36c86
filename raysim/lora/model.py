"""The resident model a worker (or the driver, for evaluation) keeps for its lifetime: the
frozen base with one LoRA adapter per rank in use, on its device."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from models.locked import can_lock_text_tower, mark_locked_text_tower
from models.lora import add_lora, lora_config
from models.minilm import enable_gradient_checkpointing, load_vlm
from raysim.config import LoraConfig
from raysim.data import FederatedData
from raysim.lora.adapters import adapter_name, ranks_in_use


@dataclass
class Resident:
    model: Any  # PeftModel with one adapter per rank in use
    data: FederatedData
    device: torch.device
    trainer: Any = None  # the backend's trainer (raysim/lora/backends.py), built on first use
    text_features: dict[int, torch.Tensor] = field(default_factory=dict)  # client -> locked tower's features


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "runtime.device is 'cuda' but this process sees no CUDA device; give workers GPUs with "
            "runtime.num_gpus_per_worker > 0, or set runtime.device=cpu"
        )
    return torch.device(name)


def build_resident(base: Path, lora: LoraConfig, data: FederatedData, seed: int, device: str) -> Resident:
    model = load_vlm(base)
    for p in model.parameters():
        p.requires_grad_(False)
    if lora.gradient_checkpointing:
        enable_gradient_checkpointing(model)
    configs = {
        adapter_name(r): lora_config(r, lora.alpha * r / lora.r, lora.dropout, lora.target_modules, lora.modules_to_save)
        for r in ranks_in_use(lora)
    }
    torch.manual_seed(seed)  # peft draws lora_A at random: make the initial adapter the seed's
    peft_model = add_lora(model, configs)
    if lora.lock_text_tower:
        if not can_lock_text_tower(model):
            raise ValueError(f"lora.lock_text_tower: the base at {base} ({type(model).__name__}) takes no precomputed "
                             "text features; use lora.base minilm or a MiniLM dual-encoder checkpoint")
        mark_locked_text_tower(model)
    peft_model.eval()
    dev = resolve_device(device)
    return Resident(peft_model.to(dev), data, dev)
