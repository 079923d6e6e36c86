"""M-Fed: multi-task federated learning through a shared encoder (arXiv 2504.09800).

Clients do different tasks (models/multitask.py: classify, regress, denoise) with
encoder-decoder models. Each round the driver broadcasts the global encoder and every
task's global decoder once; a client loads the encoder, keeps its OWN decoder on its
worker (`ctx.state["decoder"]`), trains its task loss plus a pull of that local decoder
towards its task's global decoder, and uploads encoder + local decoder. The driver
averages encoders over all clients and decoders within each task, sample-weighted, as
one grouped fold (a weighted sum per group).

`algorithm.options.mode` gives the paper's comparisons on the same code path:
- `mfed`: the above (encoder shared across tasks).
- `task_fedavg`: plain FedAvg within each task separately: one encoder and one decoder
  per task, clients start from their task's globals, no local decoder, no pull.
- `local`: no communication at all; every client keeps its encoder and decoder.

Decoder pull (`decoder_pull`, `pull_space`): the default is parameter space,
pull/2 * ||theta_local - theta_global||^2 over the decoder's parameters (FedProx on the
decoder). It is the default because it costs no extra forward pass, its scale does not
depend on the task's output size (the denoising decoder outputs 3072 values per image),
and it directly makes "the local decoder converges towards the global one". `output`
instead penalises pull * mean((D_local(z) - D_global(z))^2) on each batch's features,
which tolerates decoders that differ in weights but agree in function.

Metrics (held-out test split; denoising adds fixed, seeded noise): `<task>_<metric>`
(accuracy, r2, psnr) is the global encoder + global task decoder, except in `local`
mode where no global model exists and it is the `_clients` value.
`<task>_<metric>_clients` is the mean, over the clients of that task that took part in
the latest round, of their own model (encoder and decoder after local training),
evaluated on the worker where the model lives and folded like any other sum. Before any
round every client holds the initial model, so both keys then equal its metric.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator
from torch import nn

from actors.protocol import Broadcast, ClientContext, ClientResult, Tensors
from models import multitask as mt
from raysim.aggregate import grouped
from raysim.aggregate import weighted as agg
from raysim.aggregate.grouped import Groups, flatten, group_of, unflatten
from raysim.algorithms import options_of
from raysim.algorithms.common import FromConfig
from raysim.config import ConfigError, ExperimentConfig
from raysim.data import PairData

CLIENT_EVAL = "client_eval"
_EVAL = "eval."  # fold groups holding client-side test metrics, one per task
_TEST_NOISE_SEED = 0x7E57  # the denoising test noise is fixed so every evaluation is comparable


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    mode: Literal["mfed", "task_fedavg", "local"] = "mfed"
    # Clients per task; ids are assigned in blocks in the order classify, regress,
    # denoise (whatever the order written), and clients.total must equal the sum.
    tasks: dict[str, int] = Field(default_factory=lambda: {"classify": 6, "regress": 2, "denoise": 4})
    decoder_pull: float = Field(0.01, ge=0, description="weight of the local-to-global decoder pull (mfed)")
    pull_space: Literal["parameter", "output"] = "parameter"
    # mfed only: False starts every round from the task's global decoder instead of the
    # client's own (isolates the effect of encoder sharing from decoder personalisation).
    local_decoder: bool = True
    # LoRA on the encoder instead of full fine-tuning: rank, alpha and dropout come from
    # the `lora` section; the targets are layers of models.multitask.ImageEncoder.
    encoder_lora: bool = False
    lora_targets: list[str] = Field(default_factory=lambda: ["conv1", "conv2", "conv3", "proj"])
    noise_std: float = Field(0.5, gt=0, description="denoising: std of the Gaussian noise on [-1, 1] images")

    @field_validator("tasks")
    @classmethod
    def _known_tasks(cls, tasks: dict[str, int]) -> dict[str, int]:
        unknown = sorted(set(tasks) - set(mt.TASKS))
        if unknown:
            raise ValueError(f"unknown tasks {unknown}; known tasks: {', '.join(mt.TASKS)}")
        bad = {t: n for t, n in tasks.items() if not isinstance(n, int) or n < 1}
        if bad or not tasks:
            raise ValueError(f"every task needs at least one client, got {tasks}")
        return tasks


class TaskAssignmentError(ConfigError, ValueError):
    """The task counts do not add up to clients.total (a ConfigError so the CLI prints it plainly)."""


def task_blocks(tasks: dict[str, int], total: int) -> list[str]:
    """The task of every client id: contiguous blocks in the canonical task order."""
    counts = {t: tasks[t] for t in mt.TASKS if t in tasks}
    if sum(counts.values()) != total:
        raise TaskAssignmentError(
            f"algorithm.options.tasks {counts} assigns {sum(counts.values())} clients but clients.total is "
            f"{total}; make the counts add up to clients.total"
        )
    return [t for t, n in counts.items() for _ in range(n)]


# --- grouped tensors -------------------------------------------------------------------


def _clone(tensors: Tensors) -> Tensors:
    return {k: t.clone() for k, t in tensors.items()}


def decoder_group(task: str) -> str:
    return f"decoder.{task}"


# --- the worker's resident models ------------------------------------------------------


@dataclass
class Resident:
    """One encoder and one decoder per task, reloaded with each client's tensors, a
    frozen copy of each decoder for the output-space pull, the initial weights and the
    test split prepared per task."""

    encoder: nn.Module
    decoders: dict[str, nn.Module]
    anchors: dict[str, nn.Module]
    initial: Groups  # "encoder" and "decoder.<task>"
    test: dict[str, tuple[torch.Tensor, torch.Tensor]]


def _build_resident(cfg: ExperimentConfig, opts: Options, test: PairData) -> Resident:
    dim, size = cfg.model.hidden_size, cfg.data.image_size
    # Every process builds the same initial weights (and the same frozen LoRA base) from the seed.
    torch.manual_seed(cfg.seed)
    encoder = mt.ImageEncoder(dim, size)
    if opts.encoder_lora:
        encoder = mt.add_encoder_lora(encoder, cfg.lora.r, cfg.lora.alpha, cfg.lora.dropout, opts.lora_targets)
    decoders = {t: mt.build_decoder(t, dim, size) for t in mt.TASKS}
    anchors = {t: mt.build_decoder(t, dim, size).requires_grad_(False) for t in mt.TASKS}
    initial = {"encoder": mt.encoder_tensors(encoder)}
    initial.update({decoder_group(t): mt.module_tensors(d) for t, d in decoders.items()})
    gen = torch.Generator().manual_seed(_TEST_NOISE_SEED)
    prepared = {t: mt.task_batch(t, test.images, test.labels, opts.noise_std, gen) for t in mt.TASKS}
    return Resident(encoder, decoders, anchors, initial, prepared)


# --- local training --------------------------------------------------------------------


def _pull_term(opts: Options, decoder: nn.Module, anchor: nn.Module, global_dec: Tensors, z, pred) -> torch.Tensor:
    if opts.pull_space == "parameter":
        sq = sum(((p - global_dec[n]) ** 2).sum() for n, p in decoder.named_parameters())
        return opts.decoder_pull / 2 * sq
    with torch.no_grad():
        target = anchor(z)
    return opts.decoder_pull * mt.output_distance(pred, target)


def local_train(
    res: Resident, cfg: ExperimentConfig, opts: Options, task: str, data: PairData, seed: int, global_dec: Tensors | None
) -> dict[str, float]:
    """Train the resident encoder and `task` decoder (already loaded) on one client's data.
    `global_dec` set: add the decoder pull towards it."""
    encoder, decoder, anchor = res.encoder, res.decoders[task], res.anchors[task]
    pulling = global_dec is not None and opts.decoder_pull > 0
    if pulling and opts.pull_space == "output":
        anchor.load_state_dict(global_dec)
    t = cfg.train
    # A fresh optimizer every round: Adam moments of last round belong to another global model.
    opt = torch.optim.AdamW(mt.encoder_trainable(encoder) + list(decoder.parameters()), lr=t.lr, weight_decay=t.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    encoder.train(), decoder.train()
    losses, pulls = [], []
    for _ in range(t.local_epochs):
        order = torch.randperm(len(data), generator=gen)
        for s in range(0, len(order), t.batch_size):
            b = order[s : s + t.batch_size]
            inputs, target = mt.task_batch(task, data.images[b], data.labels[b], opts.noise_std, gen)
            z = encoder(inputs)
            pred = decoder(z)
            loss = mt.task_loss(task, pred, target)
            losses.append(loss.item())
            if pulling:
                pull = _pull_term(opts, decoder, anchor, global_dec, z, pred)
                pulls.append(pull.item())
                loss = loss + pull
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    encoder.eval(), decoder.eval()
    return {"train_loss": sum(losses) / len(losses), "pull": sum(pulls) / len(pulls) if pulls else 0.0}


# --- the algorithm ---------------------------------------------------------------------


class MFed(FromConfig):
    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.opts: Options = options_of(cfg)
        self.task_of_client = task_blocks(self.opts.tasks, cfg.clients.total)
        self.tasks = [t for t in mt.TASKS if t in self.opts.tasks]

    @cached_property
    def _eval_resident(self) -> Resident:
        return self.build_resident()

    def encoder_group(self, task: str) -> str:
        return f"encoder.{task}" if self.opts.mode == "task_fedavg" else "encoder"

    def upload_groups(self, task: str) -> set[str]:
        return set() if self.opts.mode == "local" else {self.encoder_group(task), decoder_group(task)}

    # --- driver side ----------------------------------------------------------------
    def init_server(self) -> Groups:
        # Copies: groups must not share storage (safetensors refuses to checkpoint that).
        init = self._eval_resident.initial
        state = {decoder_group(t): _clone(init[decoder_group(t)]) for t in self.tasks}
        state.update({self.encoder_group(t): _clone(init["encoder"]) for t in self.tasks})
        return state

    def broadcast(self, state: Groups, round: int, client_ids: list[int]) -> Broadcast:
        # Local training needs nothing from the driver: a client's first model is the
        # seeded initial one, which every worker builds itself.
        if self.opts.mode == "local":
            return Broadcast(round=round, tensors={})
        return Broadcast(round=round, tensors=flatten({g: ts for g, ts in state.items() if g != CLIENT_EVAL}))

    def finalize(self, state: Groups, acc: dict[str, agg.WeightedSum]) -> Groups:
        """New global tensors for every group that got uploads; groups of tasks with no
        client this round keep their value. `state` is not modified."""
        new = {g: ts for g, ts in state.items() if g != CLIENT_EVAL}
        client_eval = dict(state.get(CLIENT_EVAL, {}))
        for group, ws in sorted(acc.items()):
            mean = agg.ws_mean(ws)
            if group.startswith(_EVAL):
                task = group[len(_EVAL) :]
                client_eval.update({f"{task}.{k}": v for k, v in mean.items()})
                continue
            if group not in new or new[group].keys() != mean.keys():
                raise ValueError(f"aggregated group {group!r} does not match the server state's tensors")
            new[group] = mean
        if client_eval:
            new[CLIENT_EVAL] = client_eval
        return new

    def evaluate(self, state: Groups) -> dict[str, float]:
        res, out = self._eval_resident, {}
        client_eval = state.get(CLIENT_EVAL, {})
        for task in self.tasks:
            name = f"{task}_{mt.METRIC[task]}"
            clients = client_eval.get(f"{task}.{mt.METRIC[task]}")
            if self.opts.mode == "local" and clients is not None:
                out[name] = float(clients)
            else:
                mt.load_encoder_tensors(res.encoder, state[self.encoder_group(task)])
                res.decoders[task].load_state_dict(state[decoder_group(task)])
                metrics = mt.evaluate_task(res.encoder, res.decoders[task], task, *res.test[task], self.cfg.eval.batch_size)
                out[name] = metrics[mt.METRIC[task]]
            out[name + "_clients"] = float(clients) if clients is not None else out[name]
        return out

    def state_tensors(self, state: Groups) -> Tensors:
        return flatten(state)

    def load_state_tensors(self, tensors: Tensors) -> Groups:
        return unflatten(tensors)

    # --- worker groups (raysim/run/groups.py): a client's task: its decoder differs
    def client_families(self) -> list[str]:
        return list(mt.TASKS)

    def client_family(self, client_id: int) -> str:
        return self.task_of_client[client_id]

    # --- worker side ----------------------------------------------------------------
    def build_resident(self) -> Resident:
        return _build_resident(self.cfg, self.opts, self.data.test)

    def client_data(self, client_id: int) -> PairData:
        return self.data.client(client_id)

    def bytes_down(self, msg: Broadcast, client_id: int) -> int:
        """What this client needs: its task's encoder and decoder (the broadcast object
        holds every task's, but a deployment would send each client only its own)."""
        wanted = self.upload_groups(self.task_of_client[client_id])
        return grouped.nbytes(msg.tensors, wanted)

    def _start(self, ctx: ClientContext, msg: Broadcast, task: str) -> tuple[Tensors, Tensors, Tensors | None]:
        """(encoder, decoder) to train from, and the global decoder to pull towards (or None)."""
        init = ctx.resident.initial
        if self.opts.mode == "local":
            return (ctx.state.get("encoder", init["encoder"]), ctx.state.get("decoder", init[decoder_group(task)]), None)
        encoder = group_of(msg.tensors, self.encoder_group(task))
        global_dec = group_of(msg.tensors, decoder_group(task))
        if self.opts.mode == "task_fedavg":
            return encoder, global_dec, None
        own = ctx.state.get("decoder") if self.opts.local_decoder else None
        return encoder, own if own is not None else global_dec, global_dec

    def client_step(self, ctx: ClientContext, msg: Broadcast) -> ClientResult:
        task = self.task_of_client[ctx.client_id]
        res: Resident = ctx.resident
        encoder_start, decoder_start, global_dec = self._start(ctx, msg, task)
        mt.load_encoder_tensors(res.encoder, encoder_start)
        res.decoders[task].load_state_dict(decoder_start)
        data = self.client_data(ctx.client_id)
        metrics = local_train(res, self.cfg, self.opts, task, data, ctx.seed, global_dec)
        encoder, decoder = mt.encoder_tensors(res.encoder), mt.module_tensors(res.decoders[task])
        test = mt.evaluate_task(res.encoder, res.decoders[task], task, *res.test[task], self.cfg.eval.batch_size)
        metrics.update({f"test_{k}": v for k, v in test.items()})
        # Every mode keeps the client's own decoder (and, training alone, its encoder) on the
        # worker; whether the next round starts from it is the mode's choice (`_start`).
        ctx.state["decoder"] = decoder
        if self.opts.mode == "local":
            ctx.state["encoder"] = encoder
        upload = {} if self.opts.mode == "local" else {self.encoder_group(task): encoder, decoder_group(task): decoder}
        return ClientResult(ctx.client_id, len(data), flatten(upload), metrics)

    def zero(self, msg: Broadcast) -> dict[str, agg.WeightedSum]:
        return {}

    def accumulate(self, acc: dict[str, agg.WeightedSum], result: ClientResult) -> dict[str, agg.WeightedSum]:
        """Encoder and decoder weighted by the client's examples; its test metric weighted 1
        (a mean over clients). Updates `acc` in place, as the fold allows."""
        task = self.task_of_client[result.client_id]
        groups = unflatten(result.tensors)
        if set(groups) != self.upload_groups(task):
            raise ValueError(
                f"client {result.client_id} ({task}) uploaded groups {sorted(groups)}, "
                f"expected {sorted(self.upload_groups(task))}"
            )
        for group, tensors in sorted(groups.items()):
            agg.ws_add(acc.setdefault(group, agg.ws_zero()), tensors, float(result.num_examples))
        metric = mt.METRIC[task]
        score = {metric: torch.tensor(float(result.metrics[f"test_{metric}"]))}
        agg.ws_add(acc.setdefault(_EVAL + task, agg.ws_zero()), score, 1.0)
        return acc

    def merge(self, a: dict[str, agg.WeightedSum], b: dict[str, agg.WeightedSum]) -> dict[str, agg.WeightedSum]:
        return grouped.merge(a, b)


ALGORITHM = MFed
