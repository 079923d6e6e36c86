"""The model family (`lora.base`): where the frozen base checkpoint comes from and which
tokenizer its text tower reads. `model`: the model section, i.e. raysim's tiny CLIP
(pre-trained centrally and cached, raysim/pretrain.py) or any dual-encoder checkpoint
directory at model.path (with the tokenizer saved next to it, if any); `minilm`: the
MiniLM dual encoder, its image tower aligned centrally and cached."""
from __future__ import annotations

from pathlib import Path

from models.minilm import load_minilm_tokenizer, load_vlm_tokenizer
from raysim.config import ExperimentConfig, LoraConfig
from raysim.data import FederatedData
from raysim.pretrain import minilm_base_dir, pretrained_base_dir


def base_tokenizer(cfg: ExperimentConfig, lora: LoraConfig):
    """The base's Hugging Face tokenizer, or None: raysim's word tokenizer (the tiny CLIP)."""
    if lora.base == "minilm":
        return load_minilm_tokenizer()
    if cfg.model.kind == "pretrained":
        return load_vlm_tokenizer(cfg.model.path)
    return None


def base_dir(cfg: ExperimentConfig, lora: LoraConfig, data: FederatedData) -> Path:
    """The base checkpoint directory, built and cached first if it is raysim's own."""
    if lora.base == "minilm":
        return minilm_base_dir(cfg, lora.minilm, data)
    return pretrained_base_dir(cfg, data)
