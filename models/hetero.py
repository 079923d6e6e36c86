"""Heterogeneous small encoders that share only the representation dimension d (CreamFL).

Image towers map (B, 3, S, S) images and text towers map (input_ids, attention_mask)
to (B, d) features; nothing else about them matches, which is the point: clients
with a CNN, a tiny ViT, a GRU or a small transformer can still exchange
representations of a public set. `HeteroModel` puts up to one tower per modality,
an optional classifier head (uni-modal clients learn from digit labels) and a CLIP
logit scale (image-text clients and the server learn contrastively) together.

No BatchNorm and no dropout anywhere: running statistics would be model state outside
the parameters, and dropout would make the public-set encodings depend on an RNG.
Plain torch: no ray, no raysim.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_ARCHS = ("cnn", "vit")
TEXT_ARCHS = ("gru", "transformer")


class SmallCNN(nn.Module):
    """Three stride-2 convolutions (S -> S/8), global average pool, linear to d."""

    def __init__(self, dim: int, width: int = 16):
        super().__init__()
        self.convs = nn.ModuleList(
            [nn.Conv2d(3, width, 3, 2, 1), nn.Conv2d(width, 2 * width, 3, 2, 1), nn.Conv2d(2 * width, 4 * width, 3, 2, 1)]
        )
        self.proj = nn.Linear(4 * width, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images
        for conv in self.convs:
            x = F.relu(conv(x))
        return self.proj(x.mean(dim=(2, 3)))


def _encoder(hidden: int, layers: int, heads: int, ffn: int | None = None) -> nn.TransformerEncoder:
    layer = nn.TransformerEncoderLayer(hidden, heads, ffn or 2 * hidden, dropout=0.0, batch_first=True, norm_first=True)
    # enable_nested_tensor=False: the padded and the nested fast path give slightly
    # different numbers, and which one runs depends on train/eval mode.
    return nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)


class TinyViT(nn.Module):
    """Patch embedding, learned positions, pre-norm transformer, mean pool, linear to d."""

    def __init__(
        self,
        dim: int,
        image_size: int = 32,
        patch: int = 8,
        hidden: int = 32,
        layers: int = 1,
        heads: int = 2,
        ffn: int | None = None,
    ):
        super().__init__()
        if image_size % patch:
            raise ValueError(f"image_size {image_size} is not a multiple of the patch size {patch}")
        self.patch = nn.Conv2d(3, hidden, patch, patch)
        self.pos = nn.Parameter(torch.randn(1, (image_size // patch) ** 2, hidden) * 0.02)
        self.blocks = _encoder(hidden, layers, heads, ffn)
        self.norm = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch(images).flatten(2).transpose(1, 2) + self.pos
        return self.proj(self.norm(self.blocks(x)).mean(dim=1))


class GRUText(nn.Module):
    """Word embedding, one GRU layer; the hidden state at the last real token, linear to d."""

    def __init__(self, dim: int, vocab_size: int, hidden: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden)
        self.gru = nn.GRU(hidden, hidden, batch_first=True)
        self.proj = nn.Linear(hidden, dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.embed(input_ids))
        last = attention_mask.sum(1).clamp(min=1) - 1  # tokens are left-aligned, padding after
        return self.proj(out[torch.arange(len(out)), last])


class TransformerText(nn.Module):
    """Word + position embedding, pre-norm transformer, masked mean pool, linear to d."""

    def __init__(
        self,
        dim: int,
        vocab_size: int,
        max_len: int,
        hidden: int = 32,
        layers: int = 1,
        heads: int = 2,
        ffn: int | None = None,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, hidden)
        self.pos = nn.Parameter(torch.randn(1, max_len, hidden) * 0.02)
        self.blocks = _encoder(hidden, layers, heads, ffn)
        self.norm = nn.LayerNorm(hidden)
        self.proj = nn.Linear(hidden, dim)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids) + self.pos[:, : input_ids.shape[1]]
        x = self.norm(self.blocks(x, src_key_padding_mask=attention_mask == 0))
        m = attention_mask.unsqueeze(-1).to(x.dtype)
        return self.proj((x * m).sum(1) / m.sum(1).clamp(min=1.0))


class HeteroModel(nn.Module):
    """Up to one tower per modality. `encode_*` return L2-normalised (B, d) features, the
    representations that CreamFL exchanges; `classify_*` apply the head to the raw
    features (normalising first would cap the logits' scale)."""

    def __init__(self, image: nn.Module | None, text: nn.Module | None, dim: int, num_classes: int | None = None):
        super().__init__()
        self.image, self.text = image, text
        self.head = nn.Linear(dim, num_classes) if num_classes else None
        # CLIP's initial temperature 0.07; used only by contrastive training.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)))

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m, tower in (("image", self.image), ("text", self.text)) if tower is not None)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(images), dim=-1)

    def encode_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.text(input_ids, attention_mask), dim=-1)

    def classify_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.image(images))

    def classify_texts(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.head(self.text(input_ids, attention_mask))

    def scale(self) -> torch.Tensor:
        return self.logit_scale.exp().clamp(max=100.0)


def contrastive_loss(model: HeteroModel, images, input_ids, attention_mask) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of aligned pairs (the CLIP loss)."""
    img = model.encode_images(images)
    txt = model.encode_texts(input_ids, attention_mask)
    logits = model.scale() * img @ txt.T
    target = torch.arange(len(img))
    return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


def image_tower(arch: str, dim: int, image_size: int, width: int, layers: int = 1, heads: int = 2, patch: int = 8):
    if arch == "cnn":
        return SmallCNN(dim, width // 2)  # channels width/2, width, 2*width: about the ViT's size
    if arch == "vit":
        return TinyViT(dim, image_size, patch, width, layers, heads)
    raise ValueError(f"unknown image tower {arch!r}; known: {', '.join(IMAGE_ARCHS)}")


def text_tower(arch: str, dim: int, vocab_size: int, max_len: int, width: int, layers: int = 1, heads: int = 2):
    if arch == "gru":
        return GRUText(dim, vocab_size, width)
    if arch == "transformer":
        return TransformerText(dim, vocab_size, max_len, width, layers, heads)
    raise ValueError(f"unknown text tower {arch!r}; known: {', '.join(TEXT_ARCHS)}")


def client_model(
    image_arch: str | None,
    text_arch: str | None,
    *,
    dim: int,
    vocab_size: int,
    max_len: int,
    image_size: int,
    width: int,
    num_classes: int,
    seed: int,
) -> HeteroModel:
    """A client's model: an image and/or a text tower of the named architectures. A
    uni-modal client gets a classifier head; an image-text client (both towers) none."""
    torch.manual_seed(seed)
    image = image_tower(image_arch, dim, image_size, width) if image_arch else None
    text = text_tower(text_arch, dim, vocab_size, max_len, width) if text_arch else None
    if image is None and text is None:
        raise ValueError("a client model needs at least one tower")
    head = num_classes if (image is None) != (text is None) else None
    return HeteroModel(image, text, dim, head)


def server_model(
    *,
    dim: int,
    vocab_size: int,
    max_len: int,
    image_size: int,
    patch: int,
    hidden: int,
    layers: int,
    heads: int,
    ffn: int,
    seed: int,
) -> HeteroModel:
    """The larger server dual encoder: a ViT image tower and a transformer text tower,
    wider and deeper than any client's."""
    torch.manual_seed(seed)
    image = TinyViT(dim, image_size, patch, hidden, layers, heads, ffn)
    text = TransformerText(dim, vocab_size, max_len, hidden, layers, heads, ffn)
    return HeteroModel(image, text, dim)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
