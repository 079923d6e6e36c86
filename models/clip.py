"""Dual-encoder vision-language models: a tiny CLIP built from a config, or any
Hugging Face dual-encoder checkpoint directory, behind one small interface."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers import AutoModel, CLIPConfig, CLIPModel


def tiny_clip_config(
    *,
    vocab_size: int,
    max_text_len: int,
    image_size: int,
    patch_size: int,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    projection_dim: int,
    pad_token_id: int = 0,
    bos_token_id: int = 1,
    eos_token_id: int = 3,
) -> CLIPConfig:
    if eos_token_id == 2:
        # transformers reads eos_token_id == 2 as a legacy CLIP config and pools at argmax(input_ids).
        raise ValueError("eos_token_id must not be 2 for a custom vocabulary")
    common = dict(
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        intermediate_size=intermediate_size,
        projection_dim=projection_dim,
    )
    text = dict(
        common,
        vocab_size=vocab_size,
        max_position_embeddings=max_text_len,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
    )
    vision = dict(common, image_size=image_size, patch_size=patch_size, num_channels=3)
    return CLIPConfig(text_config=text, vision_config=vision, projection_dim=projection_dim)


def build_tiny_clip(config: CLIPConfig, seed: int) -> CLIPModel:
    torch.manual_seed(seed)
    model = CLIPModel(config)
    model.eval()
    return model


def load_dual_encoder(path: str):
    """Load a CLIP / SigLIP / VisionTextDualEncoder checkpoint directory (never from a hub)."""
    model = AutoModel.from_pretrained(path, local_files_only=True)
    model.eval()
    return model


def _features(out) -> torch.Tensor:
    # transformers 5 returns a model output whose pooler_output is the projected feature.
    return out if isinstance(out, torch.Tensor) else out.pooler_output


def encode_images(model, pixel_values: torch.Tensor) -> torch.Tensor:
    return F.normalize(_features(model.get_image_features(pixel_values=pixel_values)), dim=-1)


def encode_texts(model, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    out = model.get_text_features(input_ids=input_ids, attention_mask=attention_mask)
    return F.normalize(_features(out), dim=-1)


def logit_scale(model) -> torch.Tensor:
    return model.logit_scale.exp().clamp(max=100.0)


def contrastive_loss(model, images, input_ids, attention_mask) -> torch.Tensor:
    """Symmetric InfoNCE (the CLIP loss) over a batch of aligned pairs."""
    img = encode_images(model, images)
    txt = encode_texts(model, input_ids, attention_mask)
    logits = logit_scale(model) * img @ txt.T
    target = torch.arange(len(img), device=img.device)
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
