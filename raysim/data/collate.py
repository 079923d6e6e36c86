"""Raw examples -> tensors for the tiny CLIP: its word tokenizer and its normalisation
(RGB, image_size x image_size, pixels in [-1, 1]). A dataset yields raw examples (a PIL
image or a [0, 1] float array, and strings); the collate of the model family turns a batch
of them into tensors. A checkpoint's own processor takes this role for other families."""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

PAD, BOS, UNK, EOS = 0, 1, 2, 3  # EOS must not be 2: transformers treats eos_token_id == 2 as a legacy CLIP config

WORD = re.compile(r"[a-z]+")


def words(text: str) -> list[str]:
    return WORD.findall(text.lower())


class WordTokenizer:
    """Word-level tokenizer over a closed vocabulary (no download needed)."""

    def __init__(self, vocabulary: list[str], max_len: int):
        self.vocab = {w: i + 4 for i, w in enumerate(sorted(set(vocabulary)))}
        self.max_len = max_len

    @classmethod
    def for_digits(cls, max_len: int) -> "WordTokenizer":
        from raysim.data.digits import CAPTION_TEMPLATES, DIGIT_WORDS

        return cls([w for t in CAPTION_TEMPLATES for w in words(t)] + DIGIT_WORDS, max_len)

    @classmethod
    def from_texts(cls, texts, max_len: int) -> "WordTokenizer":
        """The vocabulary of `texts` (e.g. a dataset's training captions and class prompts)."""
        vocabulary: set[str] = set()
        for text in texts:
            vocabulary.update(words(text))
        return cls(sorted(vocabulary), max_len)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + 4

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(texts), self.max_len), PAD, dtype=torch.long)
        mask = torch.zeros((len(texts), self.max_len), dtype=torch.long)
        for row, text in enumerate(texts):
            toks = [BOS] + [self.vocab.get(w, UNK) for w in words(text)]
            toks = toks[: self.max_len - 1] + [EOS]
            ids[row, : len(toks)] = torch.tensor(toks)
            mask[row, : len(toks)] = 1
        return ids, mask


@dataclass(frozen=True)
class PairData:
    """Aligned image-caption pairs. Tensors are views, so subsets are cheap."""

    images: torch.Tensor  # (N, 3, H, W) float32, normalised to [-1, 1]
    labels: torch.Tensor  # (N,) int64 class index; -1 where the data has no label
    input_ids: torch.Tensor  # (N, L)
    attention_mask: torch.Tensor  # (N, L)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: np.ndarray | torch.Tensor) -> "PairData":
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return PairData(self.images[idx], self.labels[idx], self.input_ids[idx], self.attention_mask[idx])


def image_tensor(images: list, size: int) -> torch.Tensor:
    """(N, 3, size, size) float32 in [-1, 1] from PIL images, or from float arrays in [0, 1]
    of shape (H, W) (grey) or (H, W, 3), all of one shape (the digits: bilinear resize)."""
    if not images:
        return torch.zeros((0, 3, size, size))
    if isinstance(images[0], np.ndarray):
        x = torch.from_numpy(np.stack(images).astype(np.float32, copy=False))
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        if x.shape[-2:] != (size, size):
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
        x = x * 2 - 1
        return (x.repeat(1, 3, 1, 1) if x.shape[1] == 1 else x).contiguous()
    from PIL import Image

    pixels = []
    for img in images:
        img = img.convert("RGB")
        if img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        pixels.append(np.asarray(img, dtype=np.uint8))
    x = torch.from_numpy(np.stack(pixels)).permute(0, 3, 1, 2).float() / 255.0
    return (x * 2 - 1).contiguous()


class TinyClipCollate:
    """A batch of raw examples (dict of lists: image, text, label class indices) -> PairData."""

    def __init__(self, tokenizer: WordTokenizer, image_size: int):
        self.tokenizer = tokenizer
        self.image_size = image_size

    def __call__(self, batch: dict) -> PairData:
        ids, mask = self.tokenizer(list(batch["text"]))
        labels = torch.as_tensor(np.asarray(batch["label"], dtype=np.int64))
        return PairData(image_tensor(list(batch["image"]), self.image_size), labels, ids, mask)
