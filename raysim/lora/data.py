"""The clients' data on the path: raysim's image-caption pairs (FederatedData), tokenized
by the base's own tokenizer when it has one, with the simulated caption noise of
`faults.caption_noise` applied."""
from __future__ import annotations

import numpy as np
import torch

from raysim.config import CaptionNoise, ExperimentConfig
from raysim.data import FederatedData, PairData


class HFTokenizer:
    """A Hugging Face tokenizer behind raysim's tokenizer call: texts -> (ids, mask),
    padded to a fixed length so that identical captions have identical rows."""

    def __init__(self, tokenizer, max_len: int):
        self.tokenizer = tokenizer
        self.max_len = max_len

    def __call__(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.tokenizer(texts, padding="max_length", truncation=True, max_length=self.max_len, return_tensors="pt")
        return out["input_ids"], out["attention_mask"]


def noisy_rows(data: FederatedData, noise: CaptionNoise, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows (into data.all) whose captions are replaced, and the rows they take them from.
    Deterministic from the seed, so the driver and every worker agree."""
    rng = np.random.default_rng([seed, 0xCA9])
    targets, sources = [], []
    for c in sorted(noise.clients):
        rows = data.client_partition[c]
        n = int(round(noise.fraction * len(rows)))
        if n < 2:
            continue
        picked = rng.choice(rows, size=n, replace=False)
        targets.append(picked)
        sources.append(np.roll(picked, 1))  # a cyclic shift: no row keeps its own caption
    if not targets:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    return np.concatenate(targets), np.concatenate(sources)


def build_data(cfg: ExperimentConfig, tokenizer) -> FederatedData:
    """`tokenizer`: the base's Hugging Face tokenizer, or None for raysim's word tokenizer.
    `data.mismatched[row]`: the row's caption names another digit than its image."""
    data = FederatedData(cfg)
    targets, sources = noisy_rows(data, cfg.faults.caption_noise, cfg.seed)
    if tokenizer is None and not len(targets):
        # no caption changes, so nothing here needs the images (a local dataset decodes a
        # client's rows only in the worker that serves it)
        data.mismatched = np.zeros(1 + max((int(p.max()) for p in data.client_partition if len(p)), default=-1), bool)
        return data
    if tokenizer is not None:
        data.tokenizer = HFTokenizer(tokenizer, cfg.model.max_text_len)
        ids, mask = data.tokenizer(data.captions)
        data.all = PairData(data.all.images, data.all.labels, ids, mask)
    if len(targets):
        a = data.all
        ids, mask = a.input_ids.clone(), a.attention_mask.clone()
        ids[targets], mask[targets] = a.input_ids[sources], a.attention_mask[sources]
        data.all = PairData(a.images, a.labels, ids, mask)
    # A pair is wrong when its caption names another digit (a shuffle can keep the digit).
    data.mismatched = np.zeros(len(data.all), bool)
    data.mismatched[targets] = data.all.labels.numpy()[sources] != data.all.labels.numpy()[targets]
    return data
