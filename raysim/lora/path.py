"""LoraPath: the algorithm contract (actors/protocol.py) for every algorithm that fine-tunes
LoRA adapters of a dual encoder. It does the mechanics -- the resident model, the client's
local training, the adapter fold by `algorithm.lora_aggregation`, contribution scores,
evaluation, the run's outputs -- and leaves three hooks to the algorithm:

- `server_update(state, mean)`: the new global adapter from the round's mean (FedAvg: the mean);
- `prox_mu`: FedProx's proximal weight in the local loss (0: none);
- `configure(cfg)`: the config the path runs with: `cfg` itself, unless the algorithm maps
  its own options onto the `lora:` settings (fedlarge).
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Optional

from actors.protocol import Broadcast, ClientContext, ClientResult, RankGroupSpec, Tensors, tensors_nbytes
from models.lora import adapter_state, save_adapter
from raysim.aggregate import weighted as agg
from raysim.algorithms.common import FromConfig
from raysim.config import ExperimentConfig, LoraConfig
from raysim.data import FederatedData
from raysim.lora import adapters, checks, contribution
from raysim.lora.base import base_dir, base_tokenizer
from raysim.lora.data import build_data
from raysim.lora.evaluate import evaluate_adapter
from raysim.lora.group import rank_group_spec
from raysim.lora.model import Resident, build_resident
from raysim.lora.train import client_update

# setting -> the key a user writes for it (an algorithm mapping its own options overrides KEYS)
SETTING_KEYS = {"contribution": "lora.contribution.mode", "base": "lora.base", "lock_text_tower": "lora.lock_text_tower",
                "zero_stage": "lora.backend.zero_stage"}


@dataclass
class LoraAcc:
    ws: agg.WeightedSum
    sketches: Optional[contribution.Sketches] = None  # lora.contribution on


class LoraPath(FromConfig):
    prox_mu = 0.0
    KEYS: dict[str, str] = SETTING_KEYS

    def __init__(self, cfg: ExperimentConfig):
        self.source = cfg  # what it pickles as
        self.cfg = self.configure(cfg)
        self.lora: LoraConfig = self.cfg.lora

    def __reduce__(self):
        return type(self), (self.source,)

    def configure(self, cfg: ExperimentConfig) -> ExperimentConfig:
        return cfg

    def server_update(self, state: Tensors, mean: Tensors) -> Tensors:
        raise NotImplementedError(f"{type(self).__name__} must say how the round's mean adapter updates the state")

    # --- shared by driver and workers ---------------------------------------------
    @cached_property
    def data(self) -> FederatedData:
        return build_data(self.cfg, base_tokenizer(self.cfg, self.lora))

    @cached_property
    def base_dir(self) -> Path:
        return base_dir(self.cfg, self.lora, self.data)

    def build_resident(self, device: str | None = None) -> Resident:
        return build_resident(self.base_dir, self.lora, self.data, self.cfg.seed, device or self.cfg.runtime.device)

    @cached_property
    def _eval_resident(self) -> Resident:
        return self.build_resident()

    @cached_property
    def _sketch(self) -> contribution.Sketcher:
        return contribution.Sketcher(self.lora.contribution.sketch_dim, self.cfg.seed)

    @property
    def _rule(self) -> str:
        return self.cfg.algorithm.lora_aggregation

    def _sent(self, msg: Broadcast, client_id: int) -> Tensors:
        """What this client is sent: its rank's slice of the global adapter."""
        return adapters.for_client(msg.tensors, self.client_rank(client_id), adapters.max_rank(self.lora))

    # --- declared capabilities (actors/protocol.py) ----------------------------------
    def lora_settings(self) -> LoraConfig:
        return self.lora

    def lora_aggregation(self) -> str:
        return self._rule

    def client_rank(self, client_id: int) -> int:
        return adapters.client_rank(self.lora, client_id)

    def client_cost(self, client_id: int) -> float:
        """Work of one client step, for `runtime.assignment: balanced`."""
        return float(len(self.data.client_partition[client_id]))

    def bytes_down(self, msg: Broadcast, client_id: int) -> int:
        return tensors_nbytes(self._sent(msg, client_id))

    def client_reference(self, msg: Broadcast, client_id: int) -> Tensors:
        """What this client was sent: its update is its result minus this."""
        return self._sent(msg, client_id)

    def rank_group(self) -> RankGroupSpec | None:
        return rank_group_spec(self)

    def config_problems(self) -> list[str]:
        return checks.problems(self.cfg, self.lora, self.cfg.algorithm.name, lambda s: self.KEYS[s], self.prox_mu)

    # --- driver side ---------------------------------------------------------------
    def init_server(self) -> Tensors:
        return adapter_state(self._eval_resident.model, adapters.adapter_name(adapters.max_rank(self.lora)))

    def broadcast(self, state: Tensors, round: int, client_ids: list[int]) -> Broadcast:
        return Broadcast(round=round, tensors=state)

    def finalize(self, state: Tensors, acc: LoraAcc) -> Tensors:
        return self.server_update(state, adapters.fold_result(acc.ws, self._rule, self.lora))

    def round_metrics(self, acc: LoraAcc) -> dict:
        """This round's per-client contribution scores, from the round's fold."""
        return contribution.round_scores(acc.sketches)

    def evaluate(self, state: Tensors) -> dict[str, float]:
        r = self._eval_resident
        name = adapters.adapter_name(adapters.max_rank(self.lora))
        return evaluate_adapter(r.model, name, state, r.data, self.cfg.eval.batch_size, r.device)

    def summary_extra(self, history: list[dict]) -> dict:
        return contribution.run_summary(history)

    def save_final(self, state: Tensors, run_dir: Path) -> None:
        """run_dir/adapter loads with PeftModel.from_pretrained(base, run_dir/adapter), the
        base being run_dir/base_model (a copy of the base checkpoint, models.minilm.load_vlm
        loads it); run_dir/contribution.json: the run's contribution scores, when on."""
        name = adapters.adapter_name(adapters.max_rank(self.lora))
        save_adapter(self._eval_resident.model, name, state, run_dir / "adapter")
        shutil.copytree(self.base_dir, run_dir / "base_model", dirs_exist_ok=True)
        if self.lora.contribution.mode != "none":
            metrics = run_dir / "metrics.jsonl"
            history = [json.loads(line) for line in metrics.read_text().splitlines()] if metrics.is_file() else []
            scores = self.summary_extra(history).get("contribution", {})
            (run_dir / "contribution.json").write_text(json.dumps(scores, indent=1))

    # --- worker side ---------------------------------------------------------------
    def client_step(self, ctx: ClientContext, msg: Broadcast) -> ClientResult:
        return client_update(ctx, msg, self.cfg, self.lora, self.prox_mu)

    # --- the fold: example-weighted, by the LoRA rule ----------------------------------
    def zero(self, msg: Broadcast) -> LoraAcc:
        if self.lora.contribution.mode == "none":
            return LoraAcc(agg.ws_zero())
        r_max = adapters.max_rank(self.lora)
        refs = {r: self._sketch(adapters.rule_space(adapters.for_client(msg.tensors, r, r_max), self._rule, self.lora))
                for r in adapters.ranks_in_use(self.lora)}
        return LoraAcc(agg.ws_zero(), contribution.Sketches(refs))

    def accumulate(self, acc: LoraAcc, result: ClientResult) -> LoraAcc:
        weight = float(result.num_examples)
        acc.ws = adapters.fold_add(acc.ws, result.tensors, weight, self._rule, self.lora)
        if acc.sketches is not None:
            sketch = self._sketch(adapters.rule_space(result.tensors, self._rule, self.lora))
            acc.sketches.add(result.client_id, self.client_rank(result.client_id), sketch, weight)
        return acc

    def merge(self, a: LoraAcc, b: LoraAcc) -> LoraAcc:
        """Adds `b` into `a` (the fold's own accumulator)."""
        sketches = a.sketches.merge(b.sketches) if a.sketches is not None else None
        return LoraAcc(agg.ws_merge_into(a.ws, b.ws), sketches)
