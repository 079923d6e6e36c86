"""FedProx on LoRA adapters (Li et al. 2020): FedAvg whose local loss adds
mu/2 * ||w - w_global||^2 over the trainable adapter tensors (`algorithm.mu`).
Everything else (broadcast, fold, evaluation) is FedAvg's."""
from __future__ import annotations

from raysim.algorithms.fedavg import FedAvg
from raysim.config import ExperimentConfig


class FedProx(FedAvg):
    def __init__(self, cfg: ExperimentConfig):
        super().__init__(cfg)
        self.prox_mu = cfg.algorithm.mu


ALGORITHM = FedProx
