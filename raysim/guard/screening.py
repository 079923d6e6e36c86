"""Screening of client updates before aggregation, and quarantine of repeat offenders.

API
---
``check_update(update, reference, max_norm) -> str | None``
    ``None`` if the update may be aggregated, else a short reason ``"<kind>: <detail>"``
    where ``kind`` is one of ``REJECT_KINDS``:

    - ``"type"``      a value is not a floating-point tensor
    - ``"keys"``      missing or unexpected keys (named)
    - ``"shape"``     a key whose shape differs from the reference (key and both shapes)
    - ``"nonfinite"`` NaN or +-Inf somewhere (key named)
    - ``"norm"``      global L2 norm > ``max_norm`` (value given); skipped if ``max_norm`` is None

    ``reject_kind(reason)`` returns the kind, for counting in metrics.
``Quarantine(strikes=3, rounds=5)``
    ``record(client_id, round, ok)`` after each screened result; a client rejected
    ``strikes`` times in a row (over the rounds it took part in, not calendar rounds) is
    excluded for the next ``rounds`` rounds: ``is_quarantined(client_id, r)`` is True for
    ``round < r <= round + rounds``. ``to_dict()`` / ``Quarantine.from_dict(d)`` give a plain,
    JSON-friendly dict for checkpoints.

An update is a client's tensors minus the broadcast tensors; ``reference`` is anything with
the expected keys and shapes (usually the broadcast itself). Checks run cheapest-first and
``keys``/``shape`` come before the value checks because values cannot be compared otherwise.
Nothing here mutates its inputs or imports Ray.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from raysim.aggregate.robust import global_norm

Tensors = dict[str, torch.Tensor]

REJECT_KINDS = ("type", "keys", "shape", "nonfinite", "norm")

_MAX_NAMED = 5  # a hostile client could send thousands of keys; keep reasons short


def _names(keys) -> str:
    keys = sorted(map(str, keys))
    more = f" (+{len(keys) - _MAX_NAMED} more)" if len(keys) > _MAX_NAMED else ""
    return repr(keys[:_MAX_NAMED]) + more


def check_update(update: Tensors, reference: Tensors, max_norm: float | None) -> str | None:
    """Return ``None`` if ``update`` is acceptable, else ``"<kind>: <detail>"``."""
    if not isinstance(update, dict):
        return f"type: update is a {type(update).__name__}, not a dict of tensors"
    for k, t in update.items():
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            what = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
            return f"type: {k!r} is {what}, not a real floating-point tensor"
    missing, extra = reference.keys() - update.keys(), update.keys() - reference.keys()
    if missing or extra:
        parts = ([f"missing {_names(missing)}"] if missing else []) + ([f"unexpected {_names(extra)}"] if extra else [])
        return "keys: " + ", ".join(parts)
    for k in sorted(reference):
        if tuple(update[k].shape) != tuple(reference[k].shape):
            return f"shape: {k!r} is {tuple(update[k].shape)}, expected {tuple(reference[k].shape)}"
    for k in sorted(update):
        if not bool(torch.isfinite(update[k]).all()):
            return f"nonfinite: NaN/Inf in {k!r}"
    if max_norm is not None:
        norm = global_norm(update)
        if norm > max_norm:
            return f"norm: {norm:.6g} > max_norm {max_norm:.6g}"
    return None


def reject_kind(reason: str) -> str:
    """The kind (``"keys"``, ``"norm"``, ...) of a reason returned by ``check_update``."""
    return reason.split(":", 1)[0]


# --------------------------------------------------------------------------- quarantine


@dataclass
class Quarantine:
    """Strike counter per client: ``strikes`` consecutive rejections -> out for ``rounds`` rounds.

    Mutable state owned by the driver (like a fold accumulator); only clients with a
    running streak or an active quarantine are stored, so memory stays bounded by the
    number of misbehaving clients, not the population.
    """

    strikes: int = 3
    rounds: int = 5
    streak: dict[str, int] = field(default_factory=dict)  # consecutive rejections so far
    until: dict[str, int] = field(default_factory=dict)  # excluded while round < until

    def __post_init__(self) -> None:
        if self.strikes < 1 or self.rounds < 0:
            raise ValueError(f"need strikes >= 1 and rounds >= 0, got strikes={self.strikes}, rounds={self.rounds}")

    def record(self, client_id, round: int, ok: bool) -> None:
        """Record the screening outcome of ``client_id``'s result in ``round``."""
        cid = str(client_id)  # str keys: the dict must survive a JSON round trip unchanged
        # forget quarantines that are over, so `until` does not grow without bound
        for c in [c for c, u in self.until.items() if u <= round]:
            del self.until[c]
        if ok:
            self.streak.pop(cid, None)
            return
        n = self.streak.get(cid, 0) + 1
        if n >= self.strikes:
            self.streak.pop(cid, None)  # a released client starts with a clean slate
            if self.rounds:
                self.until[cid] = round + 1 + self.rounds
        else:
            self.streak[cid] = n

    def is_quarantined(self, client_id, round: int) -> bool:
        until = self.until.get(str(client_id))
        # the exclusion starts the round after the last strike: the striking round is over
        return until is not None and until - self.rounds <= round < until

    def quarantined(self, round: int) -> list[str]:
        """Sorted ids excluded in ``round`` (for metrics and client sampling)."""
        return sorted(c for c in self.until if self.is_quarantined(c, round))

    def to_dict(self) -> dict:
        return {
            "strikes": self.strikes,
            "rounds": self.rounds,
            "streak": dict(sorted(self.streak.items())),
            "until": dict(sorted(self.until.items())),
        }

    @classmethod
    def from_dict(cls, d: dict) -> Quarantine:
        return cls(
            strikes=int(d["strikes"]),
            rounds=int(d["rounds"]),
            streak={str(k): int(v) for k, v in d.get("streak", {}).items()},
            until={str(k): int(v) for k, v in d.get("until", {}).items()},
        )
