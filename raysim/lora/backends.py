"""Training backends (`lora.backend`): where a client's optimizer steps run. Both trainers
have the same five calls: start (load the client's start adapter and moments), forward,
step, finish (its adapter and moments), train (the model's mode).

torch: AdamW over the active adapter's parameters. deepspeed: one DeepSpeed engine per
worker (ZeRO 0-3, torch's AdamW, gloo on CPU / nccl on GPU), reused by every client the
worker serves."""
from __future__ import annotations

import os
import socket
from typing import Any

import torch

from actors.protocol import Tensors
from models.locked import keep_locked_tower_in_eval
from models.lora import activate, adapter_state, load_adapter_state, trainable_parameters
from raysim.config import LoraBackendConfig, LoraConfig, TrainConfig


def flat_optimizer_state(opt: torch.optim.Optimizer) -> Tensors:
    out = {}
    for idx, st in opt.state_dict()["state"].items():
        for name, value in st.items():
            out[f"optim.{idx}.{name}"] = torch.as_tensor(value).detach().to("cpu", copy=True)
    return out


def load_optimizer_state(opt: torch.optim.Optimizer, flat: Tensors) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value.clone()
    sd["state"] = state
    opt.load_state_dict(sd)


class TorchTrainer:
    """Plain torch: AdamW over the adapter's parameters, fresh or with the client's moments."""

    def __init__(self, model, precision: str, device: torch.device):
        self.module, self.device = model, device
        self.scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
        self.name = self.opt = None

    def forward(self, **batch):
        return self.module(**batch)

    def parameters(self) -> list[torch.nn.Parameter]:
        return trainable_parameters(self.module)

    def start(self, name: str, adapter: Tensors, lr: float, weight_decay: float, moments: Tensors | None) -> None:
        self.name = name
        activate(self.module, name)
        load_adapter_state(self.module, name, adapter)
        self.opt = torch.optim.AdamW(trainable_parameters(self.module), lr=lr, weight_decay=weight_decay)
        if moments:
            load_optimizer_state(self.opt, moments)

    def step(self, loss: torch.Tensor) -> None:
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.opt)
        self.scaler.update()

    def finish(self) -> tuple[Tensors, Tensors]:
        return adapter_state(self.module, self.name), flat_optimizer_state(self.opt)

    def train(self, mode: bool) -> None:
        self.module.train(mode)
        keep_locked_tower_in_eval(self.module)


# --- DeepSpeed -------------------------------------------------------------------------

def free_port() -> int:
    """A port the OS says is free, so every worker process rendezvous on its own port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_deepspeed_process_group(device: torch.device) -> None:
    """A one-process group per worker (this client's data-parallel world is one rank), unless
    the process already joined one (a rank of a client's group, actors/rank_group.py)."""
    import deepspeed
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return
    os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(free_port()))
    deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo", verbose=False)


def promote_scalar_parameters(model: torch.nn.Module) -> None:
    """DeepSpeed 0.19 broadcasts every parameter through `.view(torch.uint8)`, which fails
    for 0-dim tensors (CLIP's logit_scale); a 1-element vector behaves the same in the
    model's arithmetic."""
    for module in model.modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.dim() == 0:
                setattr(module, name, torch.nn.Parameter(p.detach().reshape(1), requires_grad=p.requires_grad))


def deepspeed_config(backend: LoraBackendConfig, batch_size: int) -> dict:
    zero: dict[str, Any] = {"stage": backend.zero_stage}
    if backend.offload != "none":
        zero["offload_optimizer"] = {"device": "cpu"}
    if backend.offload == "optimizer_and_params":
        zero["offload_param"] = {"device": "cpu"}
    return {
        "train_micro_batch_size_per_gpu": batch_size,
        "gradient_accumulation_steps": 1,
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,  # our torch AdamW: no DeepSpeed op to compile
        "gradient_clipping": 0.0,  # DeepSpeed's default is 1.0; the torch backend does not clip
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
        # With offload DeepSpeed insists on its CPU Adam, which compiles a C++ op at first
        # use; torch's AdamW on the CPU copy is slower per step but needs nothing compiled.
        "zero_force_ds_cpu_optimizer": False,
    }


class DeepSpeedTrainer:
    """One DeepSpeed engine per worker, built on first use and reused by every client the
    worker serves: each client loads its start adapter into the (gathered) parameters,
    DeepSpeed's fp32 master copy is refreshed from them and the AdamW moments start
    fresh, or, with train.keep_optimizer_state, from the client's own moments of its last
    training. ZeRO 1-3's AdamW runs over flat fp32 partitions (one per parameter group and
    rank), so those moments are flat too: elementwise the same numbers as the torch
    backend's per-tensor moments, in a layout fixed by the model, ZeRO stage and world
    size, which cannot change within a run (--resume keeps the config). ZeRO-0 steps
    torch's AdamW on the model's own parameters: moments per tensor, as with torch."""

    def __init__(self, model, name: str, backend: LoraBackendConfig, device: torch.device, lr: float,
                 weight_decay: float, batch_size: int):
        import deepspeed

        init_deepspeed_process_group(device)
        promote_scalar_parameters(model)
        activate(model, name)
        params = trainable_parameters(model)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        self.engine, self.zero_opt, _, _ = deepspeed.initialize(
            model=model, optimizer=opt, model_parameters=params, config=deepspeed_config(backend, batch_size)
        )
        self.module, self.name = self.engine.module, name
        self.stage = backend.zero_stage

    def _gathered(self, modify: bool):
        """Under ZeRO-3 the adapter's parameters are partitioned; gather them (only them)
        to read or write their full values."""
        import deepspeed

        return deepspeed.zero.GatheredParameters(self.parameters(), modifier_rank=0 if modify else None,
                                                 enabled=self.stage == 3)

    @property
    def _inner_optimizer(self) -> torch.optim.Optimizer:
        # ZeRO 1-3: the torch AdamW over DeepSpeed's fp32 partitions; ZeRO-0: the engine's optimizer.
        return self.zero_opt.optimizer if self.stage else self.zero_opt

    def forward(self, **batch):
        return self.engine(**batch)

    def parameters(self) -> list[torch.nn.Parameter]:
        return trainable_parameters(self.engine.module)

    def start(self, name: str, adapter: Tensors, lr: float, weight_decay: float, moments: Tensors | None) -> None:
        if name != self.name:
            raise ValueError(f"the DeepSpeed engine trains adapter {self.name}, not {name} (lora.client_ranks)")
        with self._gathered(modify=True):
            load_adapter_state(self.engine.module, self.name, adapter)
        if self.stage:
            self.zero_opt.refresh_fp32_params()
        opt = self._inner_optimizer
        opt.state.clear()  # fresh moments, or this client's own (train.keep_optimizer_state)
        if not self.stage:
            if moments:
                load_optimizer_state(opt, moments)
            return
        for i, flat in enumerate(self._partitions() if moments else []):
            opt.state[flat] = {name: (v.clone() if name == "step" else v.to(flat.device, flat.dtype, copy=True))
                               for name, v in ((k.rsplit(".", 1)[1], v) for k, v in moments.items()
                                               if k.startswith(f"optim.{i}."))}

    def step(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)
        self.engine.step()

    def finish(self) -> tuple[Tensors, Tensors]:
        with self._gathered(modify=False):
            adapter = adapter_state(self.engine.module, self.name)
        if not self.stage:
            return adapter, flat_optimizer_state(self._inner_optimizer)
        state = self._inner_optimizer.state
        moments = {f"optim.{i}.{name}": torch.as_tensor(v).detach().to("cpu", copy=True)
                   for i, flat in enumerate(self._partitions()) for name, v in state.get(flat, {}).items()}
        return adapter, moments

    def _partitions(self) -> list[torch.Tensor]:
        """This rank's flat fp32 partitions, one per parameter group: the tensors ZeRO's
        AdamW keys its state by (ZeRO-3 hands them to the optimizer only inside step)."""
        z = self.zero_opt
        return list(z.fp32_partitioned_groups_flat if self.stage == 3 else z.single_partition_of_fp32_groups)

    def train(self, mode: bool) -> None:
        self.engine.train(mode)
        keep_locked_tower_in_eval(self.engine.module)


def make_trainer(model, lora: LoraConfig, train: TrainConfig, device: torch.device, local: bool = False):
    """The trainer of `lora.backend`; `local`: a torch one, for the coordinator of a rank
    group, which only scores data quality with the global model."""
    b = lora.backend
    if b.name == "deepspeed" and not local:
        from raysim.lora.adapters import adapter_name

        micro = -(-train.batch_size // b.world_size)  # rows per rank (DeepSpeed's bookkeeping only)
        return DeepSpeedTrainer(model, adapter_name(lora.r), b, device, train.lr, train.weight_decay, micro)
    return TorchTrainer(model, lora.precision, device)
