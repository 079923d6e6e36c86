"""FederatedData: what the data config means for a run. The splits (client pool, test,
pre-training), the client partition, the tokenizer and class prompts; built identically
(from the seed) in the driver and in every worker. Partitions read label and client
columns only; a client's images are decoded when its data is asked for, in the process
that serves it, and a process keeps the decoded data of its last few clients only."""
from __future__ import annotations

import hashlib
import json
from collections import OrderedDict
from collections.abc import Sequence
from functools import cached_property

import numpy as np
import torch

from raysim.data.collate import PairData, TinyClipCollate, WordTokenizer, words
from raysim.data.errors import DataError
from raysim.data.partition import (
    partition_by_column,
    partition_dirichlet,
    partition_iid,
    partition_quantity,
    row_ids_hash,
    split_indices,
)

CLIENT_CACHE = 4  # decoded clients a process keeps (a client step may ask for its data more than once)
LOCAL_PROMPT = "a photo of a {}"


class MemoryTable:
    """Raw examples held in memory (the digits): the Table interface of raysim/data/local.py."""

    def __init__(self, columns: dict, where: str):
        self.columns, self.where = columns, where
        self.roles = {role: role for role in columns}
        self.decoded: set[int] = set()

    def __len__(self) -> int:
        return len(self.columns["label"])

    def values(self, role: str) -> list:
        return list(self.columns[role])

    def feature(self, role: str):
        return None

    def examples(self, rows) -> tuple[dict, list[int]]:
        rows = [int(r) for r in rows]
        self.decoded.update(rows)
        return {role: [col[r] for r in rows] for role, col in self.columns.items()}, rows


class UniformPartition(Sequence):
    """Client c holds rows c*k .. c*k+k-1 of a generated world: no list of a million arrays."""

    def __init__(self, num_clients: int, per_client: int):
        self.num_clients, self.per_client = num_clients, per_client

    def __len__(self) -> int:
        return self.num_clients

    def __getitem__(self, c):
        if isinstance(c, slice):
            return [self[i] for i in range(*c.indices(self.num_clients))]
        c = int(c)
        if not 0 <= c < self.num_clients:
            raise IndexError(c)
        return np.arange(c * self.per_client, (c + 1) * self.per_client)


def _sorted_values(values) -> list:
    """Distinct values, numbers numerically and strings alphabetically."""
    return sorted(set(values), key=lambda v: (isinstance(v, str), v))


class FederatedData:
    """Everything derived from the data config: splits, client partitions, prompts."""

    def __init__(self, cfg):  # the ExperimentConfig: data, clients.total, model.max_text_len, seed
        d = cfg.data
        self.cfg, self.seed, self.kind = d, cfg.seed, d.dataset
        self.max_text_len = cfg.model.max_text_len
        self.num_clients = cfg.clients.total  # by_column with "auto": set from the data below
        self._decoded_clients: OrderedDict[int, PairData] = OrderedDict()
        if d.dataset == "digits":
            self._open_digits()
        elif d.dataset == "local":
            self._open_local()
        else:
            self._open_shapes()
        self.collate = TinyClipCollate(self.tokenizer, d.image_size)
        if self.kind == "digits":
            self.all  # 1,797 small images: decoded once, as ever, and every split is a view of them

    # --- opening ---------------------------------------------------------------------
    def _open_digits(self) -> None:
        from raysim.data.digits import DIGIT_WORDS, PROMPT_TEMPLATE, digits_examples

        d = self.cfg
        self.train = self.test_table = MemoryTable(digits_examples(self.seed), "scikit-learn's digits")
        self.class_names = list(DIGIT_WORDS)
        self.prompt_template = d.prompt_template or PROMPT_TEMPLATE
        tokenizer = WordTokenizer.for_digits(self.max_text_len)
        if d.prompt_template:  # the template's own words too
            tokenizer = WordTokenizer([*tokenizer.vocab, *words(d.prompt_template)], self.max_text_len)
        self.tokenizer = tokenizer
        self.label_codes = np.asarray(self.train.columns["label"])
        self.test_label_codes = self.label_codes
        self.pool_idx, self.test_idx, self.pretrain_idx = split_indices(
            self.label_codes, d.test_fraction, d.pretrain_class_share, self.seed
        )

    def _open_local(self) -> None:
        from raysim.data.local import Table, open_splits, pick_split

        d = self.cfg
        roles = {role: col for role, col in d.columns.model_dump().items() if col}
        if "text" not in roles:
            raise DataError(
                "data.columns.text is null, but the tiny CLIP's contrastive objective trains on image-text pairs; "
                "name the caption column in data.columns.text"
            )
        if d.partition == "dirichlet" and "label" not in roles:
            raise DataError(
                "data.partition 'dirichlet' skews labels, but data.columns.label is null; name the label column, "
                "or use data.partition iid, quantity or by_column"
            )
        splits, base = open_splits(d.path, "data.path")
        self.train = Table(pick_split(splits, "train", "data.path", d.path), roles, _where(d.path, splits, "train"),
                           base, d.skip_bad_images)
        test_roles = {r: c for r, c in roles.items() if r != "client"}
        if d.test_path:
            test_splits, test_base = open_splits(d.test_path, "data.test_path")
            self.test_table = Table(pick_split(test_splits, "test", "data.test_path", d.test_path), test_roles,
                                    _where(d.test_path, test_splits, "test"), test_base, d.skip_bad_images)
        elif "test" in splits and "train" in splits:
            self.test_table = Table(splits["test"], test_roles, _where(d.path, splits, "test"), base, d.skip_bad_images)
        else:
            self.test_table = None
        self._local_labels(roles)
        groups = self._split_groups(roles)
        test_fraction = d.test_fraction if self.test_table is None else 0.0
        self.pool_idx, self.test_idx, self.pretrain_idx = split_indices(
            groups, test_fraction, [d.pretrain_fraction] * (int(groups.max()) + 1 if len(groups) else 0), self.seed
        )
        if self.test_table is None:
            self.test_table, self.test_label_codes = self.train, self.label_codes
        else:
            self.test_idx = np.arange(len(self.test_table))
        if not len(self.test_idx):
            raise DataError(
                f"the test split of {self.train.where} is empty (data.test_fraction {d.test_fraction} of "
                f"{len(self.train)} rows); raise data.test_fraction or give data.test_path"
            )
        self.prompt_template = d.prompt_template or LOCAL_PROMPT
        texts = self.train.values("text")
        vocabulary = [texts[i] for i in np.concatenate([self.pool_idx, self.pretrain_idx])]
        vocabulary += [self.prompt_template.format(n) for n in self.class_names or []]
        self.tokenizer = WordTokenizer.from_texts(vocabulary, self.max_text_len)

    def _local_labels(self, roles: dict) -> None:
        """Class names and each row's class index (-1 without a label column)."""
        if "label" not in roles:
            self.class_names = None
            self.label_codes = np.full(len(self.train), -1)
            self.test_label_codes = np.full(len(self.test_table), -1) if self.test_table is not None else None
            return
        tables = [t for t in (self.train, self.test_table) if t is not None]
        names = [_label_names(t) for t in tables]
        feature = self.train.feature("label")
        if hasattr(feature, "names"):  # a ClassLabel: keep its order
            classes = list(feature.names) + [n for n in _sorted_values(sum(names[1:], [])) if n not in feature.names]
        else:
            raw = [v for t in tables for v in t.values("label")]
            classes = [str(v) for v in _sorted_values(raw)]
        index = {n: i for i, n in enumerate(classes)}
        self.class_names = classes
        self.label_codes = np.array([index[n] for n in names[0]], dtype=np.int64)
        self.test_label_codes = np.array([index[n] for n in names[1]], dtype=np.int64) if len(names) > 1 else None

    def _split_groups(self, roles: dict) -> np.ndarray:
        """What the test and pre-training splits are stratified by: the client (by_column:
        every client keeps its share), else the label, else nothing."""
        d = self.cfg
        if d.partition != "by_column":
            return self.label_codes if "label" in roles else np.zeros(len(self.train), dtype=np.int64)
        values = self.train.values("client")
        for row, v in enumerate(values):
            if v is None:
                raise DataError(
                    f"data.columns.client: row {row} of {self.train.where} has no value in column '{roles['client']}'; "
                    "give every row a client"
                )
        self.client_values = _sorted_values(values)
        n = len(self.client_values)
        if self.num_clients == "auto":
            self.num_clients = n
        elif self.num_clients != n:
            fewer = "only " if n < self.num_clients else ""
            raise DataError(
                f"data.columns.client: column '{roles['client']}' of {self.train.where} has {fewer}{n} distinct values "
                f"but clients.total is {self.num_clients}; with data.partition by_column each value is one client, "
                f"so set clients.total: auto (or {n})"
            )
        index = {v: i for i, v in enumerate(self.client_values)}
        self.client_codes = np.array([index[v] for v in values], dtype=np.int64)
        return self.client_codes

    def _open_shapes(self) -> None:
        from raysim.data.shapes import CLASSES, PROMPT_TEMPLATE, ShapesWorld, vocabulary

        d = self.cfg
        self.world = ShapesWorld(self.seed, d)
        self.class_names = list(CLASSES)
        self.prompt_template = d.prompt_template or PROMPT_TEMPLATE
        self.tokenizer = WordTokenizer([*vocabulary(), *words(self.prompt_template)], self.max_text_len)

    def _scenes(self, scenes: list[dict], where: str) -> PairData:
        """Generated scenes through the path of users' data: an HF Dataset, a Table, the collate."""
        from raysim.data.local import Table

        table = Table(self.world.dataset(scenes), SHAPES_ROLES, where, None)
        return self._pairs(table, np.arange(len(table)), None)

    # --- clients ---------------------------------------------------------------------
    @cached_property
    def client_partition(self) -> Sequence[np.ndarray]:
        """Rows of the training table per client (shapes: positions in the client's scenes)."""
        d = self.cfg
        if self.kind == "shapes":
            return UniformPartition(self.num_clients, d.shapes.examples_per_client)
        rng = np.random.default_rng([self.seed, 11])
        pool = self.pool_idx
        try:
            if d.partition == "iid":
                parts = partition_iid(len(pool), self.num_clients, rng)
            elif d.partition == "dirichlet":
                parts = partition_dirichlet(self.label_codes[pool], self.num_clients, d.alpha, rng)
            elif d.partition == "quantity":
                parts = partition_quantity(len(pool), self.num_clients, d.quantity_exponent, rng)
            else:
                parts = partition_by_column(self.client_codes[pool], self.num_clients)
        except ValueError:
            share = "data.pretrain_fraction" if self.kind == "local" else "data.pretrain_class_share"
            raise DataError(
                f"clients.total ({self.num_clients}) exceeds the {len(pool)} rows of {self.train.where} left for clients "
                f"after the test and pre-training splits; lower clients.total, or data.test_fraction / {share}"
            ) from None
        parts = [pool[p] for p in parts]
        if d.partition == "by_column":
            empty = [k for k, p in enumerate(parts) if not len(p)]
            if empty:
                k = empty[0]
                raise DataError(
                    f"client {k} (value {self.client_values[k]!r} of data.columns.client) has no rows after the test "
                    f"and pre-training splits of {self.train.where}" + (f", nor do {len(empty) - 1} more" if len(empty) > 1 else "")
                    + "; lower data.test_fraction or data.pretrain_fraction, give data.test_path, or give it more rows"
                )
        return parts

    def client(self, client_id: int) -> PairData:
        if self.kind == "digits":
            return self.all.subset(self.client_partition[client_id])
        cached = self._decoded_clients.get(client_id)
        if cached is None:
            if self.kind == "shapes":
                cached = self._scenes(self.world.client_scenes(client_id), f"shapes client {client_id}")
            else:
                cached = self._pairs(self.train, self.client_partition[client_id], self.label_codes)
            self._decoded_clients[client_id] = cached
            while len(self._decoded_clients) > CLIENT_CACHE:
                self._decoded_clients.popitem(last=False)
        self._decoded_clients.move_to_end(client_id)
        return cached

    def client_sizes(self) -> list[int]:
        return [len(p) for p in self.client_partition]

    # --- central splits --------------------------------------------------------------
    @cached_property
    def test(self) -> PairData:
        if self.kind == "digits":
            return self.all.subset(self.test_idx)
        if self.kind == "shapes":
            return self._scenes(self.world.scenes("test", 0, self.cfg.shapes.test_size), "the shapes test split")
        return self._pairs(self.test_table, self.test_idx, self.test_label_codes)

    @cached_property
    def pretrain(self) -> PairData:
        if self.kind == "digits":
            return self.all.subset(self.pretrain_idx)
        if self.kind == "shapes":
            return self._scenes(self.world.scenes("pretrain", 0, self.cfg.shapes.pretrain_size), "the shapes pre-training split")
        return self._pairs(self.train, self.pretrain_idx, self.label_codes)

    @cached_property
    def all(self) -> PairData:
        """Every row of the training table, decoded (the digits; algorithms that need every
        row at once). A generated world has no such table."""
        if self.kind == "shapes":
            raise DataError("data.dataset shapes generates each client's scenes on demand and has no table of all rows")
        return self._pairs(self.train, np.arange(len(self.train)), self.label_codes)

    @cached_property
    def captions(self) -> list[str]:
        if self.kind == "shapes":
            raise DataError("data.dataset shapes generates each client's scenes on demand and has no table of all rows")
        return list(self.train.values("text"))

    @cached_property
    def class_prompts(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Token ids and mask of one prompt per class; None when the data has no labels."""
        if self.class_names is None:
            return None
        return self.tokenizer([self.prompt_template.format(n) for n in self.class_names])

    def _pairs(self, table, rows, codes: np.ndarray | None) -> PairData:
        """Decode `rows` of `table` into the model family's tensors. `codes`: each row's class
        index (None: the table's label column holds class indices, as a generated world's)."""
        batch, kept = table.examples(rows)
        batch["label"] = (
            np.asarray(batch["label"], dtype=np.int64) if codes is None else codes[np.asarray(kept, dtype=np.int64)]
        )
        return self.collate(batch)

    # --- what the run directory records ----------------------------------------------
    def bad_images(self) -> list[dict]:
        """Every undecodable image of a local dataset (each image decoded once, nothing
        kept). Without data.skip_bad_images the first one is a DataError."""
        if self.kind != "local":
            return []
        from raysim.data.local import BadImage, bad_image_message

        found = []
        tables = [self.train] + ([self.test_table] if self.test_table is not self.train else [])
        for table in tables:
            for bad in table.scan():
                if not self.cfg.skip_bad_images:
                    raise DataError(bad_image_message(table.where, bad["row"], BadImage(bad["file"], bad["reason"])))
                found.append({"where": table.where, **bad})
        return found

    def check(self, pretrain_needed: bool) -> None:
        """Everything that can be wrong with the data, found before anything runs: a client
        without rows, an empty pre-training split, undecodable images."""
        parts = self.client_partition
        bad = self.bad_images()
        if bad and self.kind == "local":
            bad_train = {b["row"] for b in bad if b["where"] == self.train.where}
            for k, p in enumerate(parts):
                if len(p) and bad_train.issuperset(p.tolist()):
                    raise DataError(
                        f"every image of client {k} ({len(p)} rows of {self.train.where}) cannot be decoded; "
                        "fix them, or give the client other rows"
                    )
            bad_test = {b["row"] for b in bad if b["where"] == self.test_table.where}
            if bad_test.issuperset(self.test_idx.tolist()):
                raise DataError(f"no image of the test split of {self.test_table.where} can be decoded; fix them")
        if pretrain_needed and self.kind != "digits":
            n = len(self.pretrain_idx) if self.kind == "local" else self.cfg.shapes.pretrain_size
            if n < 2:
                key = "data.pretrain_fraction" if self.kind == "local" else "data.shapes.pretrain_size"
                where = self.train.where if self.kind == "local" else "the shapes world"
                raise DataError(
                    f"the central pre-training split of {where} has {n} rows, too few to pre-train the tiny CLIP on; raise {key}, "
                    "or set pretrain.enabled: false (LoRA on a random base stays at chance)"
                )

    def partition_record(self) -> dict:
        """The partition as the run directory records it (partition.json): rows per client
        and a hash of their row ids, so two runs can be shown to train on the same split."""
        record = {"dataset": self.kind, "partition": self.cfg.partition, "clients": self.num_clients}
        if self.kind == "shapes":
            s = self.cfg.shapes
            key = {"seed": self.seed, "shapes": s.model_dump(), "image_size": self.cfg.image_size,
                   "partition": self.cfg.partition, "alpha": self.cfg.alpha}
            record.update(
                rows_per_client=[s.examples_per_client] * self.num_clients,
                row_ids="generated: client c holds scenes (seed, c, 0 .. examples_per_client - 1)",
                row_ids_sha256=hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest(),
                test_rows=s.test_size,
                pretrain_rows=s.pretrain_size,
            )
            return record
        record.update(
            rows_per_client=self.client_sizes(),
            row_ids_sha256=row_ids_hash(self.client_partition),
            test_rows=len(self.test_idx),
            pretrain_rows=len(self.pretrain_idx),
        )
        if self.cfg.partition == "by_column":
            record["client_values"] = list(self.client_values)
        if self.kind == "local":
            bad = self.bad_images()
            record["skipped_bad_images"] = len(bad)
            record["bad_images"] = bad[:100]
        return record


SHAPES_ROLES = {"image": "image", "text": "caption", "label": "label"}


def _where(path: str, splits: dict, split: str) -> str:
    return f"{path} (split '{split}')" if len(splits) > 1 else str(path)


def _label_names(table) -> list[str]:
    """Each row's class name: a ClassLabel's name, or the value as text."""
    values = table.values("label")
    feature = table.feature("label")
    for row, v in enumerate(values):
        if v is None:
            raise DataError(
                f"data.columns.label: row {row} of {table.where} has no label in column '{table.roles['label']}'; "
                "give every row a label, or set data.columns.label: null"
            )
    if hasattr(feature, "names"):
        return [feature.names[v] for v in values]
    return [str(v) for v in values]
