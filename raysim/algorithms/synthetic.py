"""Synthetic updates of a chosen size, no model: measures the runtime itself (scale,
driver memory, spilling) without training cost. Each client's update is a seeded random
vector; each client keeps a persistent state of `state_params` floats (standing in for
an adapter plus optimizer moments) that it reads and advances every time it runs."""
from __future__ import annotations

import time

import torch
from pydantic import BaseModel, ConfigDict, Field

from actors.protocol import Broadcast, ClientContext, ClientResult, Tensors
from raysim.aggregate import weighted as agg
from raysim.config import ExperimentConfig


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    num_params: int = Field(1000, ge=1, description="floats per update")
    state_params: int = Field(1000, ge=0, description="floats of persistent state per client")
    compute_s: float = Field(0.0, ge=0, description="busy time per client step")
    # An adapter is many tensors (LoRA A and B per adapted module and layer); the update
    # is split into this many, named w000, w001, ... (1: one tensor named w).
    num_tensors: int = Field(1, ge=1)


class Synthetic:
    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.opt = Options.model_validate(cfg.algorithm.options)

    def _sizes(self) -> dict[str, int]:
        n, k = self.opt.num_params, self.opt.num_tensors
        if k == 1:
            return {"w": n}
        return {f"w{i:03d}": n // k + (1 if i < n % k else 0) for i in range(k)}

    def init_server(self) -> Tensors:
        return {key: torch.zeros(size) for key, size in self._sizes().items()}

    def broadcast(self, state: Tensors, round: int, client_ids: list[int]) -> Broadcast:
        return Broadcast(round=round, tensors=state)

    def build_resident(self):
        return None

    def client_cost(self, client_id: int) -> float:
        return 1.0

    def bytes_down(self, msg: Broadcast, client_id: int) -> int:
        return self.opt.num_params * 4

    def client_reference(self, msg: Broadcast, client_id: int) -> Tensors:
        return msg.tensors

    def client_step(self, ctx: ClientContext, msg: Broadcast) -> ClientResult:
        gen = torch.Generator().manual_seed(ctx.seed)
        if self.opt.state_params:
            old = ctx.state.get("state", {}).get("x", torch.zeros(self.opt.state_params))
            ctx.state["state"] = {"x": old + torch.randn(self.opt.state_params, generator=gen)}
        end = time.perf_counter() + self.opt.compute_s
        while time.perf_counter() < end:  # busy, like training; sleeping would free the core
            pass
        update = torch.randn(self.opt.num_params, generator=gen) * 0.01
        sizes = self._sizes()
        parts = torch.split(update, list(sizes.values()))
        return ClientResult(ctx.client_id, 1, {key: msg.tensors[key] + part for key, part in zip(sizes, parts)})

    def zero(self, msg: Broadcast) -> agg.WeightedSum:
        return agg.ws_zero()

    def accumulate(self, acc: agg.WeightedSum, result: ClientResult) -> agg.WeightedSum:
        return agg.ws_add(acc, result.tensors, float(result.num_examples))

    def merge(self, a: agg.WeightedSum, b: agg.WeightedSum) -> agg.WeightedSum:
        return agg.ws_merge_into(a, b)

    def finalize(self, state: Tensors, acc: agg.WeightedSum) -> Tensors:
        return agg.ws_mean(acc, release=True)

    def evaluate(self, state: Tensors) -> dict[str, float]:
        return {"norm": float(torch.cat([t.double() for t in state.values()]).norm())}


ALGORITHM = Synthetic
