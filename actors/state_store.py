"""Per-client persistent state (adapter, optimizer moments) kept by the worker that
serves the client and written through to disk, versioned by the round that wrote it.

The driver tracks each client's current version and passes it with the client id, so a
worker uses its in-memory copy only if it is that version, and otherwise reads that
version from disk: a client may move to another worker (load balancing, a dead worker)
and a resumed run ignores state written by a round that never finished. Memory is
bounded by `memory_budget_bytes`: least recently used states are dropped from memory
(they are on disk) and come back bit-identical.

`root` is a local directory or a filesystem URL (`s3://bucket/run/client_state`, any
protocol fsspec implements): with a URL, states are read and written there (safetensors
bytes through `fs.cat_file` / `fs.pipe_file`), so a run retried on a fresh cluster finds
them wherever its workers run."""
from __future__ import annotations

import os
import re
from collections import OrderedDict
from pathlib import Path

import torch
from safetensors.torch import load, load_file, save, save_file

State = dict[str, dict[str, torch.Tensor]]
_VERSION = re.compile(r"^r(\d+)\.safetensors$")


def _flatten(state: State) -> dict[str, torch.Tensor]:
    return {f"{group}/{key}": t.contiguous() for group, ts in state.items() for key, t in ts.items()}


def _unflatten(flat: dict[str, torch.Tensor]) -> State:
    state: State = {}
    for k, t in flat.items():
        group, key = k.split("/", 1)
        state.setdefault(group, {})[key] = t
    return state


def state_nbytes(state: State) -> int:
    return sum(t.numel() * t.element_size() for ts in state.values() for t in ts.values())


class ClientStateStore:
    def __init__(self, root: str | Path, memory_budget_bytes: int | None = None, keep_versions: int = 2):
        self.url = str(root).rstrip("/") if "://" in str(root) else None
        if self.url:
            import fsspec.core

            self.fs, base = fsspec.core.url_to_fs(self.url)
            self.root = base.rstrip("/")
            protocols = self.fs.protocol if isinstance(self.fs.protocol, (tuple, list)) else (self.fs.protocol,)
            self._local_fs = "file" in protocols  # needs directories; object stores do not
        else:
            self.fs, self.root = None, Path(root)
        self.keep_versions = keep_versions
        self.budget = memory_budget_bytes
        self.memory: OrderedDict[int, tuple[int, State]] = OrderedDict()  # LRU: cid -> (version, state)
        self.memory_bytes = 0
        self.loads_from_disk = 0

    def _dir(self, client_id: int):
        if self.fs is not None:
            return f"{self.root}/{client_id:06d}"
        return self.root / f"{client_id:06d}"

    def versions(self, client_id: int) -> list[int]:
        d = self._dir(client_id)
        if self.fs is not None:
            try:
                self.fs.invalidate_cache(d)
                names = [p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(d, detail=False)]
            except FileNotFoundError:
                return []
        elif d.is_dir():
            names = [p.name for p in d.iterdir()]
        else:
            return []
        return sorted(int(m.group(1)) for n in names if (m := _VERSION.match(n)))

    def get(self, client_id: int, version: int) -> State:
        """The client's state as written in round `version` (0: never trained, empty)."""
        if version == 0:
            return {}
        hit = self.memory.get(client_id)
        if hit is not None and hit[0] == version:
            self.memory.move_to_end(client_id)
            return hit[1]
        if self.fs is not None:
            try:
                data = self.fs.cat_file(f"{self._dir(client_id)}/r{version}.safetensors")
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"state of client {client_id} from round {version} is missing: "
                    f"{self.url}/{client_id:06d}/r{version}.safetensors"
                ) from None
            self.loads_from_disk += 1
            return _unflatten(load(data))
        path = self._dir(client_id) / f"r{version}.safetensors"
        if not path.is_file():
            raise FileNotFoundError(f"state of client {client_id} from round {version} is missing: {path}")
        self.loads_from_disk += 1
        return _unflatten(load_file(str(path)))

    def put(self, client_id: int, round: int, state: State, base: int) -> None:
        """Write the client's state of `round`, computed from its state of round `base` (the
        newest version the driver has accepted; 0: none)."""
        # An empty state is written too: the driver counts the version as existing.
        d = self._dir(client_id)
        if self.fs is not None:
            if self._local_fs:
                self.fs.makedirs(d, exist_ok=True)
            # One object, written whole (object stores never show a partial one).
            self.fs.pipe_file(f"{d}/r{round}.safetensors", save(_flatten(state)))
        else:
            d.mkdir(parents=True, exist_ok=True)
            tmp = d / f".r{round}.tmp"
            save_file(_flatten(state), str(tmp))
            os.replace(tmp, d / f"r{round}.safetensors")
        for old in self._superseded(self.versions(client_id), round, base):
            if self.fs is not None:
                try:
                    self.fs.rm_file(f"{d}/r{old}.safetensors")
                except FileNotFoundError:
                    pass
            else:
                (d / f"r{old}.safetensors").unlink(missing_ok=True)
        self._remember(client_id, round, state)

    def _superseded(self, versions: list[int], round: int, base: int) -> list[int]:
        """Versions to delete after writing `round`. Kept: enough accepted versions that the
        state as of the last checkpoint survives until the next one (a client writes at most
        one version per round). Versions between `base` and `round` were written by runs
        whose results the driver dropped (late stragglers, over-selection): never read, and
        counted they would push the accepted `base` out."""
        dropped = [v for v in versions if base < v < round]
        history = [v for v in versions if v <= base]
        return dropped + history[: max(0, len(history) - (self.keep_versions - 1))]

    def secret(self, client_id: int, name: str, nbytes: int = 32) -> bytes:
        """Random bytes of the client's own, made on first use and kept in its directory
        next to its state versions (e.g. SecAgg's key material): every worker that serves
        the client, on any node, reads the same ones; the driver never reads them."""
        d = self._dir(client_id)
        if self.fs is not None:
            path = f"{d}/{name}"
            try:
                return self.fs.cat_file(path)
            except FileNotFoundError:
                pass
            # Made at the client's first use, by the one worker serving it then: there is no
            # concurrent writer (object stores have no atomic create).
            if self._local_fs:
                self.fs.makedirs(d, exist_ok=True)
            self.fs.pipe_file(path, os.urandom(nbytes))
            return self.fs.cat_file(path)
        path = d / name
        if not path.is_file():
            d.mkdir(parents=True, exist_ok=True)
            tmp = d / f".{name}.tmp{os.getpid()}"
            tmp.write_bytes(os.urandom(nbytes))
            try:
                os.link(tmp, path)  # first writer wins, so every worker agrees on the secret
            except FileExistsError:
                pass
            tmp.unlink()
        return path.read_bytes()

    def forget(self, client_ids) -> None:
        """Drop these clients' in-memory copies (their files stay)."""
        for cid in client_ids:
            old = self.memory.pop(cid, None)
            if old is not None:
                self.memory_bytes -= state_nbytes(old[1])

    def _remember(self, client_id: int, version: int, state: State) -> None:
        old = self.memory.pop(client_id, None)
        if old is not None:
            self.memory_bytes -= state_nbytes(old[1])
        self.memory[client_id] = (version, state)
        self.memory_bytes += state_nbytes(state)
        while self.budget is not None and self.memory_bytes > self.budget and len(self.memory) > 1:
            _, (_, evicted) = self.memory.popitem(last=False)  # spill: the copy on disk stays
            self.memory_bytes -= state_nbytes(evicted)
