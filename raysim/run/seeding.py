"""Every random choice derives from (experiment seed, round, client id), so a run is
reproducible whatever the worker count, scheduling or restarts."""
from __future__ import annotations

import numpy as np

_SAMPLER = 0x5A3D1E  # stream tags keep the sampler and the client streams apart
_CLIENT = 0xC11E47


def derive_seed(seed: int, round: int, client_id: int) -> int:
    """A 31-bit seed for one client's work in one round."""
    return int(np.random.SeedSequence([seed, _CLIENT, round, client_id]).generate_state(1)[0] >> 1)


def sample_clients(seed: int, round: int, total: int, k: int, exclude: set[int] | None = None) -> list[int]:
    """The sorted ids of the k clients of one round (without replacement)."""
    candidates = np.array([c for c in range(total) if not exclude or c not in exclude])
    if k > len(candidates):
        raise ValueError(f"cannot sample {k} clients from {len(candidates)} available")
    rng = np.random.default_rng([seed, _SAMPLER, round])
    return sorted(int(c) for c in rng.choice(candidates, size=k, replace=False))
