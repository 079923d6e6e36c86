"""Combinations of settings the path cannot honour, beyond what the config's own validators
see (they span sections or need the checkpoint). Each problem names its key as the user
wrote it (`key(setting)`: e.g. 'lora.contribution.mode', or fedlarge's algorithm.options)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from raysim.config import ExperimentConfig, LoraConfig

MEANPOOL = "raysim-meanpool-dual-encoder"  # models/minilm.py: the dual encoder that takes text features


def _checkpoint_type(path: str) -> str | None:
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        return None  # pretrained_base_dir reports a missing checkpoint


def problems(cfg: ExperimentConfig, lora: LoraConfig, name: str, key: Callable[[str], str],
             prox_mu: float = 0.0) -> list[str]:
    out = []
    c = cfg
    guarded = (c.privacy.dp or c.privacy.secure_aggregation or c.robust.rule != "mean"
               or c.robust.max_norm_ratio is not None)
    if lora.contribution.mode != "none" and guarded:
        out.append(f"{key('contribution')}: '{lora.contribution.mode}' (algorithm '{name}') sketches every client's "
                   "update, which the driver does not see under privacy.dp, privacy.secure_aggregation or a robust.rule "
                   "other than mean; set it to 'none' or drop those options")
    if lora.base == "minilm" and c.model.kind == "pretrained":
        out.append(f"{key('base')}: 'minilm' (algorithm '{name}') builds its own base, so model.kind 'pretrained' and "
                   "model.path would not be read; choose one")
    if lora.lock_text_tower and lora.base == "model":
        kind = _checkpoint_type(c.model.path) if c.model.kind == "pretrained" else "tiny_clip"
        if kind != MEANPOOL and not (c.model.kind == "pretrained" and kind is None):
            out.append(f"{key('lock_text_tower')}: (algorithm '{name}') needs a dual encoder that takes precomputed "
                       f"text features (lora.base 'minilm', or a '{MEANPOOL}' checkpoint at model.path); "
                       f"this base is '{kind}'")
    if prox_mu > 0 and lora.backend.name == "deepspeed" and lora.backend.zero_stage == 3:
        out.append(f"algorithm.mu: the proximal term (algorithm '{name}') reads every adapter weight, which ZeRO-3 "
                   f"partitions across ranks; use {key('zero_stage')} 0-2 or algorithm.mu 0")
    return out
