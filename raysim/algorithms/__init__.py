"""One file per algorithm. `raysim.algorithms.load(name)` finds `ALGORITHM` in
`raysim/algorithms/<name>.py`, or takes a dotted path "package.module:Class"."""
from __future__ import annotations

import importlib


def load(name: str):
    if ":" in name:
        module, attr = name.split(":", 1)
        return getattr(importlib.import_module(module), attr)
    if not name.isidentifier():
        raise ValueError(f"algorithm.name '{name}' is neither a module under raysim/algorithms/ nor 'pkg.module:Class'")
    try:
        module = importlib.import_module(f"raysim.algorithms.{name}")
    except ModuleNotFoundError as err:
        if err.name == f"raysim.algorithms.{name}":
            raise ValueError(f"algorithm.name '{name}' is not a file in raysim/algorithms/ (e.g. fedavg, fedprox)") from None
        raise
    return module.ALGORITHM
