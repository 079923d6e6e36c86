"""The Driver actor: hosts the round loop object (built inside the actor from a factory
the caller passes, so this layer never imports raysim) and forwards method calls."""
from __future__ import annotations

from typing import Any, Callable

import ray


class Host:
    def __init__(self, factory: Callable[..., Any], *args: Any):
        # A failed construction (e.g. a bad config) is kept and raised by the first call, so
        # the caller gets the original exception rather than an opaque dead actor.
        self.obj, self.error = None, None
        try:
            self.obj = factory(*args)
        except Exception as err:  # noqa: BLE001 - re-raised on the next call
            self.error = err

    def call(self, method: str, *args: Any) -> Any:
        if self.error is not None:
            raise self.error
        return getattr(self.obj, method)(*args)


# num_cpus=0: the driver only coordinates; the CPUs belong to the client workers.
Driver = ray.remote(num_cpus=0)(Host)
