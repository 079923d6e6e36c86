"""FedAvg on LoRA adapters of a dual-encoder VLM (McMahan et al. 2017), with
heterogeneous client ranks aggregated per `algorithm.lora_aggregation`."""
from __future__ import annotations

import shutil
from functools import cached_property
from pathlib import Path

from actors.protocol import Broadcast, ClientContext, ClientResult, Tensors
from raysim.aggregate import weighted as agg
from raysim import vlm_lora
from raysim.algorithms.common import FromConfig
from raysim.config import ExperimentConfig
from raysim.pretrain import pretrained_base_dir
from models.lora import save_adapter


class FedAvg(FromConfig):
    """`prox_mu` > 0 adds FedProx's proximal term (see fedprox.py)."""

    prox_mu = 0.0

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg

    @cached_property
    def _eval_resident(self) -> vlm_lora.Resident:
        return vlm_lora.build_resident(self.cfg, self.data)

    # --- driver side ----------------------------------------------------------------
    def init_server(self) -> Tensors:
        return vlm_lora.initial_adapter(self._eval_resident, self.cfg)

    def broadcast(self, state: Tensors, round: int, client_ids: list[int]) -> Broadcast:
        return Broadcast(round=round, tensors=state)

    def finalize(self, state: Tensors, acc: agg.WeightedSum) -> Tensors:
        return vlm_lora.adapter_fold_result(acc, self.cfg)

    def evaluate(self, state: Tensors) -> dict[str, float]:
        return vlm_lora.evaluate_adapter(self._eval_resident, self.cfg, state)

    def save_final(self, state: Tensors, run_dir: Path) -> None:
        """run_dir/adapter loads with PeftModel.from_pretrained(base, run_dir/adapter), the
        base being run_dir/base_model (a copy of the pre-trained checkpoint)."""
        name = vlm_lora.adapter_name(vlm_lora.max_rank(self.cfg))
        save_adapter(self._eval_resident.model, name, state, run_dir / "adapter")
        shutil.copytree(pretrained_base_dir(self.cfg), run_dir / "base_model", dirs_exist_ok=True)

    def datasets(self) -> tuple[str, ...]:
        return ("digits", "shapes", "local")  # any: it trains on the collated raw examples

    # --- worker side ----------------------------------------------------------------
    def build_resident(self) -> vlm_lora.Resident:
        return vlm_lora.build_resident(self.cfg, self.data)

    def client_cost(self, client_id: int) -> float:
        """Work of one client step, for `runtime.assignment: balanced`."""
        return float(len(self.data.client_partition[client_id]))

    def bytes_down(self, msg: Broadcast, client_id: int) -> int:
        rank = vlm_lora.client_rank(self.cfg, client_id)
        sent = vlm_lora.for_client(msg.tensors, rank, vlm_lora.max_rank(self.cfg))
        return sum(t.numel() * t.element_size() for t in sent.values())

    def lora_aggregation(self) -> str:
        return self.cfg.algorithm.lora_aggregation  # read by vlm_lora's adapter fold

    def client_rank(self, client_id: int) -> int:
        return vlm_lora.client_rank(self.cfg, client_id)

    def client_reference(self, msg: Broadcast, client_id: int) -> Tensors:
        """What this client was sent: its update is its result minus this."""
        return vlm_lora.for_client(msg.tensors, vlm_lora.client_rank(self.cfg, client_id), vlm_lora.max_rank(self.cfg))

    def client_step(self, ctx: ClientContext, msg: Broadcast) -> ClientResult:
        rank = vlm_lora.client_rank(self.cfg, ctx.client_id)
        start = vlm_lora.for_client(msg.tensors, rank, vlm_lora.max_rank(self.cfg))
        tensors, metrics = vlm_lora.local_train(
            ctx.resident, self.cfg, ctx.client_id, ctx.seed, start, ctx.state, prox_mu=self.prox_mu
        )
        # the rows it trained on (data.skip_bad_images may have left some of its partition out)
        return ClientResult(ctx.client_id, len(ctx.resident.data.client(ctx.client_id)), tensors, metrics)

    def zero(self, msg: Broadcast) -> agg.WeightedSum:
        return agg.ws_zero()

    def accumulate(self, acc: agg.WeightedSum, result: ClientResult) -> agg.WeightedSum:
        return vlm_lora.adapter_fold_add(acc, result.tensors, float(result.num_examples), self.cfg)

    def merge(self, a: agg.WeightedSum, b: agg.WeightedSum) -> agg.WeightedSum:
        return agg.ws_merge_into(a, b)  # `a` is the fold's own accumulator


ALGORITHM = FedAvg
