"""One file per algorithm. `load(name)` finds `ALGORITHM` in `raysim/algorithms/<name>.py`,
or takes a dotted path "package.module:Class". A module may declare an `Options`
pydantic model for its `algorithm.options` section."""
from __future__ import annotations

import importlib
from types import ModuleType

from pydantic import ValidationError

from raysim.config import ConfigError, ExperimentConfig, format_errors


def module_of(name: str) -> ModuleType:
    module_name = name.split(":", 1)[0] if ":" in name else f"raysim.algorithms.{name}"
    if ":" not in name and not name.isidentifier():
        raise ValueError(f"'{name}' is neither a file under raysim/algorithms/ nor 'package.module:Class'")
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name and module_name.startswith(err.name):
            where = "a file in raysim/algorithms/ (e.g. fedavg, fedprox)" if ":" not in name else "an importable module"
            raise ValueError(f"'{name}' is not {where}") from None
        raise


def load(name: str):
    module = module_of(name)
    attr = name.split(":", 1)[1] if ":" in name else "ALGORITHM"
    if not hasattr(module, attr):
        raise ValueError(f"algorithm module {module.__name__} defines no {attr}")
    return getattr(module, attr)


def options_of(cfg: ExperimentConfig, source: str = "<config>"):
    """The algorithm's validated `algorithm.options` (None if it declares no Options model)."""
    try:
        module = module_of(cfg.algorithm.name)
        if not isinstance(load(cfg.algorithm.name), type):
            raise ValueError(f"'{cfg.algorithm.name}' is not a class (an algorithm is a class taking the config)")
    except ValueError as err:
        raise ConfigError(f"invalid config {source}:\n  - algorithm.name: {err}") from None
    model = getattr(module, "Options", None)
    if model is None:
        if cfg.algorithm.options:
            raise ConfigError(
                f"invalid config {source}:\n  - algorithm.options: {cfg.algorithm.name} takes no options, "
                f"got {sorted(cfg.algorithm.options)}"
            )
        return None
    try:
        return model.model_validate(cfg.algorithm.options)
    except ValidationError as err:
        text = format_errors(err, source).replace("\n  - ", "\n  - algorithm.options.")
        raise ConfigError(text) from None
