"""Which options an algorithm can honour, checked before anything runs.

An option that the chosen algorithm cannot honour is a config error naming the key and the
algorithm, never silently ignored. Each row: the key, when it counts as asked for, and what
the algorithm must declare (an optional group of actors/protocol.py) to honour it. An
algorithm adds its own cross-checks through `ConfigProblems`.
"""
from __future__ import annotations

from typing import Callable

from actors.protocol import (
    Algorithm,
    ConfigProblems,
    DataPartition,
    GuardableUpdates,
    HeterogeneousRanks,
    LoraAggregation,
    LoraFineTuning,
)
from raysim.config import CaptionNoise, ConfigError, ExperimentConfig, LoraConfig

GUARD = "returns client updates shaped like what the clients were sent (GuardableUpdates: client_reference)"

# (key, asked for in this config?, the protocol needed, what that protocol means)
ROWS: list[tuple[str, Callable[[ExperimentConfig], bool], type, str]] = [
    ("privacy.dp", lambda c: c.privacy.dp, GuardableUpdates, GUARD),
    ("privacy.secure_aggregation", lambda c: c.privacy.secure_aggregation, GuardableUpdates, GUARD),
    ("robust.rule", lambda c: c.robust.rule != "mean", GuardableUpdates, GUARD),
    ("robust.max_norm_ratio", lambda c: c.robust.max_norm_ratio is not None, GuardableUpdates, GUARD),
    ("robust.max_update_norm", lambda c: c.robust.max_update_norm is not None, GuardableUpdates, GUARD),
    ("faults.nan_clients", lambda c: bool(c.faults.nan_clients), GuardableUpdates, GUARD),
    ("faults.byzantine_fraction", lambda c: c.faults.byzantine_fraction > 0, GuardableUpdates, GUARD),
    (
        "algorithm.lora_aggregation",
        lambda c: c.algorithm.lora_aggregation != "factors",
        LoraAggregation,
        "combines LoRA factors by a rule (LoraAggregation)",
    ),
    (
        "lora.client_ranks",
        lambda c: bool(c.lora.client_ranks),
        HeterogeneousRanks,
        "trains adapters of different ranks per client (HeterogeneousRanks)",
    ),
]
LORA_PATH = "clients fine-tune LoRA adapters on the one LoRA path, raysim/lora/ (LoraFineTuning)"
# The settings of the LoRA path beyond the adapter's shape: set to anything but their default,
# they need an algorithm on that path.
PATH_SETTINGS = ["base", "minilm", "loss", "backend", "precision", "gradient_checkpointing", "lock_text_tower",
                 "quality", "contribution"]
ROWS += [
    (f"lora.{name}", lambda c, name=name: getattr(c.lora, name) != getattr(LoraConfig(), name), LoraFineTuning, LORA_PATH)
    for name in PATH_SETTINGS
]
ROWS.append(("faults.caption_noise", lambda c: c.faults.caption_noise != CaptionNoise(), LoraFineTuning, LORA_PATH))


def problems(cfg: ExperimentConfig, algorithm) -> list[str]:
    name = cfg.algorithm.name
    if not isinstance(algorithm, Algorithm):
        core = ("init_server", "broadcast", "build_resident", "client_step", "zero", "accumulate", "merge", "finalize",
                "evaluate")
        missing = [m for m in core if not callable(getattr(algorithm, m, None))]
        return [f"algorithm.name: '{name}' is not an algorithm: it lacks {', '.join(missing)} (actors/protocol.py, Algorithm)"]
    out = [
        f"{key}: algorithm '{name}' cannot honour it: that needs an algorithm that {means}; "
        f"remove {key} or choose another algorithm"
        for key, asked, protocol, means in ROWS
        if asked(cfg) and not isinstance(algorithm, protocol)
    ]
    guarded = cfg.privacy.dp or cfg.privacy.secure_aggregation or cfg.robust.rule != "mean"
    if guarded and cfg.algorithm.lora_aggregation != "factors" and isinstance(algorithm, GuardableUpdates):
        out.append(
            f"algorithm.lora_aggregation: '{cfg.algorithm.lora_aggregation}' (algorithm '{name}') cannot be combined with privacy.dp, "
            "privacy.secure_aggregation or a robust.rule other than mean, which combine updates factor by factor; "
            "use 'factors' or drop those options"
        )
    readable = algorithm.datasets() if isinstance(algorithm, DataPartition) else ("digits",)
    if cfg.data.dataset not in readable:
        out.append(
            f"data.dataset: algorithm '{name}' trains on {' or '.join(readable)} only, not '{cfg.data.dataset}'; "
            "use one of those, or an algorithm that reads any dataset (fedavg, fedprox)"
        )
    if isinstance(algorithm, ConfigProblems):
        out += algorithm.config_problems()
    return out


def check(cfg: ExperimentConfig, algorithm, source: str = "<config>") -> None:
    found = problems(cfg, algorithm)
    if found:
        raise ConfigError(f"invalid config {source}:\n" + "\n".join(f"  - {p}" for p in found))
