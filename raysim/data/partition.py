"""Splits and client partitions: pure functions of row attributes (labels, client values)
and a numpy Generator, so they are deterministic from the seed and never touch an image."""
from __future__ import annotations

import hashlib

import numpy as np


def split_indices(
    labels: np.ndarray, test_fraction: float, pretrain_class_share: list[float], seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified (client pool, test, pretrain) index split. The pretrain split takes
    `pretrain_class_share[c]` of class c's non-test examples and is never given to clients.
    `labels` are group codes 0..K-1 (classes, or client values for a by_column partition)."""
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


def _too_many(num_clients: int, n: int) -> None:
    if num_clients > n:
        raise ValueError(f"cannot give {num_clients} clients at least one of {n} examples each")


def partition_iid(n: int, num_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    _too_many(num_clients, n)
    return [np.sort(part) for part in np.array_split(rng.permutation(n), num_clients)]


def partition_dirichlet(
    labels: np.ndarray, num_clients: int, alpha: float, rng: np.random.Generator
) -> list[np.ndarray]:
    """Label skew: each class is split over clients by proportions ~ Dir(alpha).
    Clients left empty take one example from the largest client, so all can train."""
    if alpha <= 0:
        raise ValueError(f"Dirichlet alpha must be > 0, got {alpha}")
    _too_many(num_clients, len(labels))
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


def partition_quantity(n: int, num_clients: int, exponent: float, rng: np.random.Generator) -> list[np.ndarray]:
    """Quantity skew: client sizes proportional to draws of a Pareto (power) law with shape
    `exponent` (each client holds at least one row); which rows a client holds is IID."""
    _too_many(num_clients, n)
    weights = rng.pareto(exponent, size=num_clients) + 1.0
    sizes = 1 + rng.multinomial(n - num_clients, weights / weights.sum())
    order = rng.permutation(n)
    return [np.sort(part) for part in np.split(order, np.cumsum(sizes)[:-1])]


def partition_by_column(codes: np.ndarray, num_clients: int) -> list[np.ndarray]:
    """The natural partition: client k holds the rows whose client value has code k."""
    return [np.flatnonzero(codes == k) for k in range(num_clients)]


def row_ids_hash(parts) -> str:
    """sha256 of every client's row ids in client order (each list length-prefixed)."""
    h = hashlib.sha256()
    for part in parts:
        ids = np.asarray(part, dtype="<i8")
        h.update(np.array([len(ids)], dtype="<i8").tobytes())
        h.update(ids.tobytes())
    return h.hexdigest()
