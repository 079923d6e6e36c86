"""A client over several ranks (lora.backend.world_size > 1). The algorithm only declares
the group (rank_group_spec, actors/protocol.py RankGroups); the worker builds it
(actors/rank_group.py: Ray actors in one placement group, one torch.distributed world) and
hands it to the client step as ctx.group. GroupRank is what runs on each rank."""
from __future__ import annotations

import functools
import os

import torch

from actors.protocol import RankGroupSpec, Tensors
from raysim.lora.adapters import adapter_name
from raysim.lora.backends import make_trainer
from raysim.lora.distributed import frozen_logit_scale
from raysim.lora.train import train_batches


class GroupRank:
    """One rank of a client's group: its own copy of the base with the adapter and a
    DeepSpeed engine over the group's world. The coordinator (the client's worker) sends
    each client's start adapter, kept rows and their weights; every rank trains on its
    share; rank 0 returns the adapter."""

    def __init__(self, path, rank: int, world_size: int):
        self.path, self.rank, self.world_size = path, rank, world_size
        self.res = path.build_resident("cuda" if path.lora.backend.rank_num_gpus else "cpu")
        self.logit_scale = frozen_logit_scale(self.res.model)
        # DeepSpeed over the group torch.distributed already joined
        self.trainer = make_trainer(self.res.model, path.lora, path.cfg.train, self.res.device)

    def train_client(self, adapter: Tensors, client_id: int, rows: torch.Tensor, weights: torch.Tensor | None,
                     seed: int, moments: Tensors | None):
        t, lora = self.path.cfg.train, self.path.lora
        prefix = f"rank{self.rank}."  # the coordinator keeps every rank's optimizer partition
        mine = {k[len(prefix):]: v for k, v in (moments or {}).items() if k.startswith(prefix)}
        self.trainer.start(adapter_name(lora.r), adapter, t.lr, t.weight_decay, mine or None)
        data = self.res.data.client(client_id).subset(rows)
        losses = train_batches(self.trainer, data, weights, seed, t, lora, self.res.device, self.path.prox_mu,
                               self.rank, self.world_size, self.logit_scale)
        tensors, moments = self.trainer.finish()
        return (tensors if self.rank == 0 else None), moments, losses


def rank_group_spec(path) -> RankGroupSpec | None:
    b = path.lora.backend
    if b.world_size == 1:
        return None
    env = {k: os.environ[k] for k in ("TORCH_EXTENSIONS_DIR", "RAYSIM_CACHE") if k in os.environ}
    return RankGroupSpec(functools.partial(GroupRank, path), b.world_size, b.rank_num_cpus, b.rank_num_gpus,
                         path.cfg.runtime.torch_threads, env)
