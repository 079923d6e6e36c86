"""Offline image-caption data and partitioners.

The embedded dataset is scikit-learn's bundled digits (1,797 8x8 images), upscaled
to RGB and paired with generated captions, so image, text and image-text clients
exist without any download.
"""
from __future__ import annotations

import gzip
import importlib.util
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
CAPTION_TEMPLATES = [
    "a photo of the digit {}",
    "a handwritten {}",
    "an image of the number {}",
    "the digit {} written by hand",
    "a small picture of a {}",
]
PROMPT_TEMPLATE = "a photo of the digit {}"

PAD, BOS, UNK, EOS = 0, 1, 2, 3  # EOS must not be 2: transformers treats eos_token_id == 2 as a legacy CLIP config


class WordTokenizer:
    """Word-level tokenizer over the captions' closed vocabulary (no download needed)."""

    def __init__(self, words: list[str], max_len: int):
        self.vocab = {w: i + 4 for i, w in enumerate(sorted(set(words)))}
        self.max_len = max_len

    @classmethod
    def for_digits(cls, max_len: int) -> "WordTokenizer":
        words = [w for t in CAPTION_TEMPLATES for w in re.findall(r"[a-z]+", t)] + DIGIT_WORDS
        return cls(words, max_len)

    @property
    def vocab_size(self) -> int:
        return len(self.vocab) + 4

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(texts), self.max_len), PAD, dtype=torch.long)
        mask = torch.zeros((len(texts), self.max_len), dtype=torch.long)
        for row, text in enumerate(texts):
            toks = [BOS] + [self.vocab.get(w, UNK) for w in re.findall(r"[a-z]+", text.lower())]
            toks = toks[: self.max_len - 1] + [EOS]
            ids[row, : len(toks)] = torch.tensor(toks)
            mask[row, : len(toks)] = 1
        return ids, mask


@dataclass(frozen=True)
class PairData:
    """Aligned image-caption pairs. Tensors are views, so subsets are cheap."""

    images: torch.Tensor  # (N, 3, H, W) float32, normalised to [-1, 1]
    labels: torch.Tensor  # (N,) int64
    input_ids: torch.Tensor  # (N, L)
    attention_mask: torch.Tensor  # (N, L)

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, idx: np.ndarray | torch.Tensor) -> "PairData":
        idx = torch.as_tensor(np.asarray(idx), dtype=torch.long)
        return PairData(self.images[idx], self.labels[idx], self.input_ids[idx], self.attention_mask[idx])


def digits_arrays() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's digits, (1797, 8, 8) images and labels, read from the CSV the package
    ships, as `sklearn.datasets.load_digits` reads it. Importing sklearn costs ~1.2 s (it
    imports scipy.stats), paid by the driver and every worker on their way to round 1."""
    spec = importlib.util.find_spec("sklearn")  # finds the package without importing it
    path = Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    if not path.is_file():  # a layout this reader does not know: the library's loader
        from sklearn.datasets import load_digits

        digits = load_digits()
        return digits.images, digits.target
    with gzip.open(path, "rt") as f:
        data = np.loadtxt(f, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def load_digits_pairs(image_size: int, tokenizer: WordTokenizer, seed: int = 0) -> tuple[PairData, list[str]]:
    images, targets = digits_arrays()
    x = torch.tensor(images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
    x = (x * 2 - 1).repeat(1, 3, 1, 1).contiguous()
    labels = torch.tensor(targets, dtype=torch.long)
    rng = np.random.default_rng(seed)
    templates = rng.integers(0, len(CAPTION_TEMPLATES), size=len(labels))
    captions = [CAPTION_TEMPLATES[t].format(DIGIT_WORDS[y]) for t, y in zip(templates, labels.tolist())]
    ids, mask = tokenizer(captions)
    return PairData(x, labels, ids, mask), captions


def split_indices(
    labels: np.ndarray, test_fraction: float, pretrain_class_share: list[float], seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified (client pool, test, pretrain) index split. The pretrain split takes
    `pretrain_class_share[c]` of class c's non-test examples and is never given to clients."""
    rng = np.random.default_rng([seed, 7])
    pool, test, pretrain = [], [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_test = int(round(len(idx) * test_fraction))
        test.append(idx[:n_test])
        rest = idx[n_test:]
        share = pretrain_class_share[c] if c < len(pretrain_class_share) else 0.0
        n_pre = int(round(len(rest) * share))
        pretrain.append(rest[:n_pre])
        pool.append(rest[n_pre:])
    return tuple(np.sort(np.concatenate(part)) for part in (pool, test, pretrain))


def partition_iid(n: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    if num_clients > n:
        raise ValueError(f"cannot give {num_clients} clients at least one of {n} examples each")
    return [np.sort(part) for part in np.array_split(rng.permutation(n), num_clients)]


def partition_dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Label skew: each class is split over clients by proportions ~ Dir(alpha).
    Clients left empty take one example from the largest client, so all can train."""
    if alpha <= 0:
        raise ValueError(f"Dirichlet alpha must be > 0, got {alpha}")
    if num_clients > len(labels):
        raise ValueError(f"cannot give {num_clients} clients at least one of {len(labels)} examples each")
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        props = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(props)[:-1] * len(idx)).astype(int)
        for k, chunk in enumerate(np.split(idx, cuts)):
            parts[k].extend(chunk.tolist())
    for k in range(num_clients):
        if not parts[k]:
            donor = max(range(num_clients), key=lambda j: (len(parts[j]), -j))
            parts[k].append(parts[donor].pop())
    return [np.sort(np.array(p, dtype=np.int64)) for p in parts]


class FederatedData:
    """Everything derived from the data config: splits, client partitions, prompts.
    Built identically (from the seed) in the driver and in every worker; a worker
    only ever materialises its own clients' subsets."""

    def __init__(self, cfg):  # the ExperimentConfig: data, clients.total, model.max_text_len, seed
        data_cfg, seed = cfg.data, cfg.seed
        self.cfg = data_cfg
        self.num_clients = cfg.clients.total
        self.seed = seed
        self.tokenizer = WordTokenizer.for_digits(cfg.model.max_text_len)
        self.all, self.captions = load_digits_pairs(data_cfg.image_size, self.tokenizer, seed)
        labels = self.all.labels.numpy()
        self.pool_idx, self.test_idx, self.pretrain_idx = split_indices(
            labels, data_cfg.test_fraction, data_cfg.pretrain_class_share, seed
        )

    @cached_property
    def client_partition(self) -> list[np.ndarray]:
        rng = np.random.default_rng([self.seed, 11])
        labels = self.all.labels.numpy()[self.pool_idx]
        if self.cfg.partition == "iid":
            parts = partition_iid(len(labels), self.num_clients, rng)
        else:
            parts = partition_dirichlet(labels, self.num_clients, self.cfg.alpha, rng)
        return [self.pool_idx[p] for p in parts]

    def client(self, client_id: int) -> PairData:
        return self.all.subset(self.client_partition[client_id])

    def client_sizes(self) -> list[int]:
        return [len(p) for p in self.client_partition]

    @cached_property
    def test(self) -> PairData:
        return self.all.subset(self.test_idx)

    @cached_property
    def pretrain(self) -> PairData:
        return self.all.subset(self.pretrain_idx)

    @cached_property
    def class_prompts(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.tokenizer([PROMPT_TEMPLATE.format(w) for w in DIGIT_WORDS])
