"""One client's local training on the path: its local epochs (train_batches), and the whole
client step (client_update): start from its slice of the global adapter, score its data
(lora.quality), train here or in its rank group, keep its state."""
from __future__ import annotations

import torch

from actors.protocol import Broadcast, ClientContext, ClientResult
from models.locked import locked_text_features, locked_text_tower
from raysim.config import ExperimentConfig, LoraConfig, TrainConfig
from raysim.data import PairData
from raysim.lora.adapters import adapter_name, client_rank, for_client, max_rank
from raysim.lora.backends import TorchTrainer, make_trainer
from raysim.lora.distributed import group_logits, shard_rows
from raysim.lora.objective import autocast, clip_loss, model_inputs, model_logits_loss
from raysim.lora.quality import client_weights


def batch_loss(trainer, data: PairData, b: torch.Tensor, weights, lora: LoraConfig, device, rank: int = 0,
               world_size: int = 1, logit_scale=None, text_features=None) -> torch.Tensor:
    """The loss of batch `b` (row indices into `data`); with world_size > 1 this rank forwards
    only its share of the rows and the loss is the whole batch's."""
    w = None if weights is None else weights[b].to(device)
    if lora.logits() == "clip":  # the torch backend: the encoders are called directly
        with autocast(device, lora.precision):
            return clip_loss(trainer.module, model_inputs(data, b, device), w)
    rows = b if world_size == 1 else shard_rows(b, rank, world_size)
    with autocast(device, lora.precision):
        out = trainer.forward(**model_inputs(data, rows, device, text_features))
    if world_size == 1:
        return model_logits_loss(out.logits_per_image, w)
    return model_logits_loss(group_logits(out, len(b), logit_scale, check=lora.precision == "fp32"), w)


def train_batches(trainer, data: PairData, weights: torch.Tensor | None, seed: int, train: TrainConfig,
                  lora: LoraConfig, device: torch.device, prox_mu: float = 0.0, rank: int = 0, world_size: int = 1,
                  logit_scale=None, text_features: torch.Tensor | None = None) -> list[float]:
    """A client's local epochs; the batches are drawn from the seed (every rank of a group
    draws the same). `weights`: per-pair quality weights (None: all count the same).
    `prox_mu` > 0 adds FedProx's mu/2 * ||w - w_start||^2 over the trainable tensors.
    `text_features`: the locked text tower's features of `data`'s rows."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # dropout masks: the same in either backend (with one rank)
    trainer.train(True)
    params = trainer.parameters()
    anchors = [p.detach().clone() for p in params] if prox_mu > 0 else None
    losses = []
    for _ in range(train.local_epochs):
        for b in torch.randperm(len(data), generator=gen).split(train.batch_size):
            if len(b) < 2:  # a contrastive loss needs at least one negative
                continue
            loss = batch_loss(trainer, data, b, weights, lora, device, rank, world_size, logit_scale, text_features)
            if anchors is not None:
                loss = loss + prox_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))
            trainer.step(loss)
            losses.append(loss.item())
    trainer.train(False)
    return losses


def _text_features(res, client_id: int, data: PairData, batch_size: int) -> torch.Tensor:
    """The locked tower's features of a client's captions, computed once per worker (the
    client's captions never change in a run)."""
    if client_id not in res.text_features:
        res.text_features[client_id] = locked_text_features(res.model, data.input_ids, data.attention_mask,
                                                            batch_size, res.device)
    return res.text_features[client_id]


def client_update(ctx: ClientContext, msg: Broadcast, cfg: ExperimentConfig, lora: LoraConfig,
                  prox_mu: float = 0.0) -> ClientResult:
    """Train client ctx.client_id from its slice of the broadcast adapter. Updates ctx.state
    (optimizer moments, quality scores, personal adapter). `ctx.group`: the rank group
    (lora.backend.world_size > 1) that trains it; this process then only scores its data."""
    res, t, cid = ctx.resident, cfg.train, ctx.client_id
    rank = client_rank(lora, cid)
    start = for_client(msg.tensors, rank, max_rank(lora))
    grouped = ctx.group is not None
    if res.trainer is None:
        res.trainer = make_trainer(res.model, lora, t, res.device, local=grouped)
    trainer = res.trainer
    moments = ctx.state.get("optimizer") if t.keep_optimizer_state else None
    trainer.start(adapter_name(rank), start, t.lr, t.weight_decay, None if grouped else moments)
    data = res.data.client(cid)
    n_local = len(data)
    features = None
    if not grouped and isinstance(trainer, TorchTrainer) and locked_text_tower(res.model) is not None:
        features = _text_features(res, cid, data, cfg.eval.batch_size)
    weights = client_weights(ctx.state, ctx.round, trainer, data, lora.quality, cfg.eval.batch_size, res.device,
                             lora.precision, features)
    rows = torch.arange(n_local) if weights is None else torch.nonzero(weights > 0).flatten()
    data = data.subset(rows)  # filtered pairs are not even loaded
    weights = None if weights is None else weights[rows]
    if grouped:
        results = ctx.group.call("train_client", start, cid, rows, weights, ctx.seed, moments)
        tensors, _, losses = results[0]
        moments = {f"rank{r}.{k}": v for r, (_, m, _) in enumerate(results) for k, v in m.items()}
    else:
        losses = train_batches(trainer, data, weights, ctx.seed, t, lora, res.device, prox_mu,
                               text_features=None if features is None else features[rows])
        tensors, moments = trainer.finish()
    if t.keep_optimizer_state:
        ctx.state["optimizer"] = moments
    ctx.state["adapter"] = tensors  # the client's personal adapter after this round
    metrics = {"train_loss": sum(losses) / len(losses) if losses else float("nan"), "rank": float(rank)}
    if weights is not None:
        metrics["kept_fraction"] = len(rows) / n_local
    return ClientResult(cid, len(data), tensors, metrics)
