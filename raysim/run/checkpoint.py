"""Per-round checkpoints: server tensors in safetensors plus a small JSON with the round
and a content hash. Written atomically (temp dir + rename); a checkpoint whose hash
does not match is reported and the previous good one is used."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch
# safetensors.torch (and so torch) is imported where it is used: the CLI imports this
# module for CheckpointError before Ray starts, and torch's import would delay Ray by ~1.5 s.


class CheckpointError(Exception):
    """A checkpoint that cannot be used; the CLI prints it and exits with code 2."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def checkpoint_root(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def save_checkpoint(run_dir: Path, round: int, tensors: dict[str, torch.Tensor], meta: dict, keep_last: int) -> Path:
    root = checkpoint_root(run_dir)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"round-{round:05d}"
    tmp = root / f".tmp-round-{round:05d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp / "server.safetensors"))
    meta = dict(meta, round=round, sha256=_sha256(tmp / "server.safetensors"))
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1))
    with open(tmp / "meta.json", "rb") as f:
        os.fsync(f.fileno())
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = checkpoint_root(run_dir)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("round-"))


def read_checkpoint(path: Path) -> tuple[int, dict[str, torch.Tensor], dict]:
    from safetensors.torch import load_file

    try:
        meta = json.loads((path / "meta.json").read_text())
        if _sha256(path / "server.safetensors") != meta["sha256"]:
            raise CheckpointError(f"checkpoint {path} is corrupted: its content hash does not match meta.json")
        return int(meta["round"]), load_file(str(path / "server.safetensors")), meta
    except CheckpointError:
        raise
    except Exception as err:  # truncated JSON, missing file, unreadable safetensors
        raise CheckpointError(f"checkpoint {path} is unreadable ({type(err).__name__}: {err})") from None


def load_latest(run_dir: Path, warn=lambda m: print(m, file=sys.stderr)):
    """The newest readable checkpoint, or None if the run has none. Bad ones are skipped
    with a warning; if every one is bad, that is an error."""
    found = list_checkpoints(run_dir)
    problems = []
    for path in reversed(found):
        try:
            return read_checkpoint(path)
        except CheckpointError as err:
            problems.append(str(err))
            warn(f"warning: {err}; trying the previous checkpoint")
    if found:
        raise CheckpointError(
            "no usable checkpoint in " + str(checkpoint_root(run_dir)) + ": " + "; ".join(problems)
            + ". Start a new run with another --out directory."
        )
    return None
