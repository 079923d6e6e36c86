"""What every algorithm built from the typed config shares."""
from __future__ import annotations

from functools import cached_property

from raysim.config import ExperimentConfig
from raysim.data import FederatedData


class FromConfig:
    """An algorithm whose every setting follows from `cfg`.

    It pickles as its config: Ray ships only the settings to the workers, which rebuild
    the cached models and data themselves (from the same seed, so identically).
    """

    cfg: ExperimentConfig

    def __reduce__(self):
        return type(self), (self.cfg,)

    @cached_property
    def data(self) -> FederatedData:
        return FederatedData(self.cfg)

    def partition_record(self) -> dict:
        return self.data.partition_record()

    def datasets(self) -> tuple[str, ...]:
        """The data.dataset values it trains on: the digits unless it says otherwise."""
        return ("digits",)
