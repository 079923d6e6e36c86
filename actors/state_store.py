"""Per-client persistent state (adapter, optimizer moments) kept by the worker that
serves the client, written through to disk so that a resumed run, or another worker,
finds it. Each write is versioned by round: a run resumed from round R reads the newest
version <= R, so state written by a round that never finished is ignored."""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

State = dict[str, dict[str, torch.Tensor]]
_VERSION = re.compile(r"r(\d+)\.safetensors$")


def _flatten(state: State) -> dict[str, torch.Tensor]:
    return {f"{group}/{key}": t.contiguous() for group, ts in state.items() for key, t in ts.items()}


def _unflatten(flat: dict[str, torch.Tensor]) -> State:
    state: State = {}
    for k, t in flat.items():
        group, key = k.split("/", 1)
        state.setdefault(group, {})[key] = t
    return state


class ClientStateStore:
    def __init__(self, root: str | Path | None, max_round: int | None = None):
        self.root = Path(root) if root else None
        self.max_round = max_round  # resume point: ignore versions written after it
        self.memory: dict[int, State] = {}

    def _dir(self, client_id: int) -> Path:
        return self.root / f"{client_id:06d}"

    def _versions(self, client_id: int) -> list[tuple[int, Path]]:
        d = self._dir(client_id)
        if not d.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in d.iterdir() if (m := _VERSION.search(p.name))]
        return sorted(found)

    def get(self, client_id: int) -> State:
        if client_id in self.memory:
            return self.memory[client_id]
        state: State = {}
        if self.root is not None:
            usable = [(r, p) for r, p in self._versions(client_id) if self.max_round is None or r <= self.max_round]
            if usable:
                state = _unflatten(load_file(str(usable[-1][1])))
        self.memory[client_id] = state
        return state

    def put(self, client_id: int, round: int, state: State) -> None:
        self.memory[client_id] = state
        if self.root is None or not state:
            return
        d = self._dir(client_id)
        d.mkdir(parents=True, exist_ok=True)
        final = d / f"r{round}.safetensors"
        tmp = d / f".r{round}.tmp"
        save_file(_flatten(state), str(tmp))
        os.replace(tmp, final)
        # Keep this version and the one before it: a crash inside the next round must
        # still find the state as of the last finished round.
        for _, old in self._versions(client_id)[:-2]:
            old.unlink(missing_ok=True)
