"""The contrastive objective: symmetric InfoNCE over a batch of aligned image-caption pairs,
each pair's two terms weighted by its quality weight when there are weights.

`lora.loss` says where the logits come from: `clip` = raysim's CLIP loss on the encoders'
features (models/clip.py: logit scale clamped at 100), `model_logits` = the logits of the
checkpoint's own forward (what DeepSpeed's engine and a locked text tower run)."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from models.clip import contrastive_loss, encode_images, encode_texts, logit_scale
from raysim.data import PairData


def autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def weighted_clip_loss(logits_per_image: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE where pair i's two terms count `weights[i]` (all ones: the CLIP loss)."""
    target = torch.arange(len(logits_per_image), device=logits_per_image.device)
    per_pair = (F.cross_entropy(logits_per_image, target, reduction="none")
                + F.cross_entropy(logits_per_image.T, target, reduction="none")) / 2
    return (per_pair * weights).sum() / weights.sum()


def model_inputs(data: PairData, rows, device, text_features: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The forward's keyword arguments for these rows; a locked tower's features replace the captions."""
    if text_features is not None:
        return {"pixel_values": data.images[rows].to(device), "text_features": text_features[rows].to(device)}
    return {"pixel_values": data.images[rows].to(device), "input_ids": data.input_ids[rows].to(device),
            "attention_mask": data.attention_mask[rows].to(device)}


def clip_loss(model, batch: dict[str, torch.Tensor], weights: torch.Tensor | None) -> torch.Tensor:
    """lora.loss 'clip'. Unweighted: exactly models.clip.contrastive_loss."""
    if weights is None:
        return contrastive_loss(model, batch["pixel_values"], batch["input_ids"], batch["attention_mask"])
    img = encode_images(model, batch["pixel_values"])
    txt = encode_texts(model, batch["input_ids"], batch["attention_mask"])
    return weighted_clip_loss(logit_scale(model) * img @ txt.T, weights)


def model_logits_loss(logits_per_image: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """lora.loss 'model_logits', from the forward's logits (computed in float32)."""
    logits = logits_per_image.float()
    return weighted_clip_loss(logits, torch.ones(len(logits), device=logits.device) if weights is None else weights)
