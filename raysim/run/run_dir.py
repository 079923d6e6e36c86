"""The run directory: config.yaml, metrics.jsonl, checkpoints and client state, at a local
path or a filesystem URL (worked on in a local staging copy and mirrored)."""
from __future__ import annotations

import json
import time
from pathlib import Path


from raysim.config import ConfigError, ExperimentConfig, load_config, save_config
from raysim.run.storage import Mirror, is_url

# Keys that may differ between the original run and its --resume: more rounds, another
# runtime (e.g. resume on a different cluster), evaluation and checkpoint cadence.
_RESUMABLE_KEYS = {"rounds", "runtime", "eval", "checkpoint", "name"}


def _diff(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [f"{prefix[:-1]} ({a!r} in the run directory, {b!r} now)"]


class RunDir:
    """The run directory: a local path, or a filesystem URL (raysim/run/storage.py) whose run
    is worked on in a local staging directory and mirrored to the URL by `sync`."""

    def __init__(self, out: str | Path, staging: str | Path | None = None):
        self.mirror = Mirror(str(out), staging) if is_url(out) else None
        self.path = self.mirror.staging if self.mirror else Path(out)
        self.location = self.mirror.url if self.mirror else str(self.path)  # for messages
        self.metrics = self.path / "metrics.jsonl"
        # Client state is written by the workers, wherever they run: at the URL itself.
        self.client_state = f"{self.mirror.url}/client_state" if self.mirror else str(self.path / "client_state")

    def prepare(self, cfg: ExperimentConfig, resume: bool | str) -> bool:
        """Check the directory against `resume` (True, False or "auto": resume if it holds a
        run) and write config.yaml; returns whether the run resumes."""
        p, m = self.path, self.mirror
        if m is not None:
            m.check(cfg.runtime.num_workers)
            holds = m.holds_run()
        else:
            holds = (p / "config.yaml").is_file()
        if resume == "auto":
            resume = holds
        if resume:
            if not holds:
                raise ConfigError(f"--resume: {self.location} holds no run (no config.yaml); drop --resume to start one there")
            if m is not None:
                m.prepare_staging()
                m.download()
            saved = p / "config.yaml"
            try:
                old = load_config(saved).to_dict()
            except ConfigError as err:
                raise ConfigError(
                    f"--resume: the run's own {saved} cannot be read, so the run cannot be checked against it: {err}. "
                    "Restore that file (its checkpoints are untouched) or start a new run with another --out."
                ) from None
            new = cfg.to_dict()
            diffs = [d for k in sorted(set(old) - _RESUMABLE_KEYS) for d in _diff(old[k], new.get(k), k + ".")]
            if diffs:
                raise ConfigError(
                    f"--resume: the checkpoint directory {self.location} was made by a different config: "
                    + "; ".join(diffs)
                    + ". Resume with the original config, or start a new run with another --out."
                )
        else:
            if m is not None:
                nonempty = bool(m.remote_files())
            else:
                if p.exists() and not p.is_dir():
                    raise ConfigError(f"--out {p} is a file, not a directory; choose another --out (nothing was changed)")
                nonempty = p.exists() and any(p.iterdir())
            if nonempty:
                raise ConfigError(
                    f"run directory {self.location} is not empty; pass --resume to continue that run, or choose another --out "
                    "(nothing there was changed)"
                )
            if m is not None:
                m.prepare_staging()
        try:
            p.mkdir(parents=True, exist_ok=True)
            save_config(cfg, p / "config.yaml")
        except OSError as err:  # a parent that is a file, no permission, a full disk
            raise ConfigError(f"--out {p}: cannot write there ({err.strerror or err}); choose another --out") from None
        self.sync()
        return bool(resume)

    def sync(self) -> float:
        """Mirror the staging directory to the URL (nothing for a local run); seconds taken."""
        if self.mirror is None:
            return 0.0
        t0 = time.perf_counter()
        self.mirror.sync()
        return time.perf_counter() - t0

    def truncate_metrics(self, last_round: int) -> list[dict]:
        """Keep the records of rounds <= last_round (a resumed run rewrites later ones).
        Blank lines are skipped, and a last line cut short (the run was killed writing it)
        is dropped; any other unreadable line stops the resume before the file is touched."""
        if not self.metrics.is_file():
            return []
        try:
            lines = self.metrics.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise ConfigError(
                f"--resume: {self.metrics} is not UTF-8 text (byte {err.start}); repair or remove that byte, "
                "or start a new run with another --out (nothing was changed)"
            ) from None
        records = []
        numbered = [(i, line) for i, line in enumerate(lines, 1) if line.strip()]
        for i, line in numbered:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                if i == numbered[-1][0]:
                    break  # the write the run was killed in; the checkpoint has what it held
                raise ConfigError(
                    f"--resume: line {i} of {self.metrics} is not a JSON record; repair or delete that line, "
                    "or start a new run with another --out (nothing was changed)"
                ) from None
        kept = [r for r in records if r["round"] <= last_round]
        self.metrics.write_text("".join(json.dumps(r) + "\n" for r in kept))
        return kept

    def append(self, record: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")

    def records(self) -> list[dict]:
        return [json.loads(line) for line in self.metrics.read_text().splitlines()] if self.metrics.is_file() else []
