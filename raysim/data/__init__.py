"""The data layer: where examples come from and how they are split over clients.

- `digits`: scikit-learn's bundled 8x8 digits with generated captions (raysim/data/digits.py);
- `shapes`: a procedurally generated world, per client on demand (raysim/data/shapes.py);
- `local`: a Hugging Face dataset on local disk (raysim/data/local.py).

Each yields raw examples (an image and strings); the model family's collate turns them into
tensors (raysim/data/collate.py); partitions are pure functions (raysim/data/partition.py);
FederatedData ties them to a config (raysim/data/federated.py).
"""
from __future__ import annotations

from raysim.data.collate import BOS, EOS, PAD, UNK, PairData, TinyClipCollate, WordTokenizer
from raysim.data.digits import CAPTION_TEMPLATES, DIGIT_WORDS, PROMPT_TEMPLATE, digits_arrays
from raysim.data.errors import DataError
from raysim.data.federated import FederatedData
from raysim.data.partition import (
    partition_by_column,
    partition_dirichlet,
    partition_iid,
    partition_quantity,
    row_ids_hash,
    split_indices,
)

__all__ = [
    "BOS", "CAPTION_TEMPLATES", "DIGIT_WORDS", "DataError", "EOS", "FederatedData", "PAD", "PROMPT_TEMPLATE",
    "PairData", "TinyClipCollate", "UNK", "WordTokenizer", "data_key", "digits_arrays", "load_digits_pairs", "partition_by_column",
    "partition_dirichlet", "partition_iid", "partition_quantity", "prepare", "resolve_clients", "row_ids_hash",
    "split_indices",
]


def load_digits_pairs(image_size: int, tokenizer: WordTokenizer, seed: int = 0) -> tuple[PairData, list[str]]:
    """Every digit as tensors, and the captions."""
    from raysim.data.digits import digits_examples

    examples = digits_examples(seed)
    return TinyClipCollate(tokenizer, image_size)(examples), examples["text"]


def resolve_clients(cfg, num_clients: int):
    """`cfg` with clients.total set to `num_clients` (what `auto` stands for), validated again."""
    from raysim.config import config_from_dict

    d = cfg.to_dict()
    d["clients"]["total"] = num_clients
    return config_from_dict(d, f"(clients.total auto: {num_clients} distinct values of data.columns.client)")


def prepare(cfg):
    """Open and check the data of `cfg` before anything runs (columns, labels, partition,
    every image once): a DataError names what is wrong. Returns `cfg` with clients.total
    `auto` resolved, and the FederatedData."""
    data = FederatedData(cfg)
    data.check(pretrain_needed=cfg.pretrain.enabled and cfg.model.kind == "tiny_clip")
    if cfg.clients.total == "auto":
        cfg = resolve_clients(cfg, data.num_clients)
    return cfg, data


def data_key(cfg) -> dict:
    """What the pre-training split and the tokenizer depend on, for cache keys (the
    digits' keys are those of every earlier version, so their cached bases stay valid)."""
    d = cfg.to_dict()["data"]
    key = {k: d[k] for k in ("dataset", "image_size", "test_fraction", "pretrain_class_share")}
    if d["prompt_template"] is not None:
        key["prompt_template"] = d["prompt_template"]
    if d["dataset"] == "local":
        from raysim.data.local import files_fingerprint

        key.update({k: d[k] for k in ("path", "test_path", "columns", "pretrain_fraction", "skip_bad_images")})
        key["by_column"] = d["partition"] == "by_column"  # the splits are stratified by client then
        key["files"] = [files_fingerprint(d["path"]), files_fingerprint(d["test_path"])]
    elif d["dataset"] == "shapes":
        key["shapes"] = d["shapes"]
    return key
