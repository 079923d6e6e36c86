"""Functions shared by the algorithms that fine-tune LoRA adapters of a dual-encoder
VLM (FedAvg, FedProx): the worker's resident model, local training, adapter folds
and zero-shot evaluation. Plain functions, no Ray."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from actors.protocol import Tensors
from models.clip import contrastive_loss, encode_images, encode_texts, load_dual_encoder
from models.lora import (
    activate,
    adapter_state,
    add_lora,
    load_adapter_state,
    lora_config,
    trainable_parameters,
)
from raysim.aggregate import lora as lora_agg
from raysim.aggregate import weighted as agg
from raysim.config import ExperimentConfig
from raysim.data import FederatedData
from raysim.pretrain import pretrained_base_dir


def client_rank(cfg: ExperimentConfig, client_id: int) -> int:
    ranks = cfg.lora.client_ranks
    return ranks[client_id % len(ranks)] if ranks else cfg.lora.r


def ranks_in_use(cfg: ExperimentConfig) -> list[int]:
    return sorted(set(cfg.lora.client_ranks)) if cfg.lora.client_ranks else [cfg.lora.r]


def max_rank(cfg: ExperimentConfig) -> int:
    return max(ranks_in_use(cfg))


def scaling(cfg: ExperimentConfig) -> float:
    # lora_alpha grows with the rank (alpha * r / lora.r) so every rank has the same
    # scaling alpha / lora.r and truncated or padded factors stay interchangeable.
    return cfg.lora.alpha / cfg.lora.r


def adapter_name(rank: int) -> str:
    return f"r{rank}"


@dataclass
class Resident:
    """What a worker (or the driver, for evaluation) keeps for its lifetime."""

    model: object  # PeftModel with one adapter per rank in use
    data: FederatedData
    device: torch.device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(
            "runtime.device is 'cuda' but this process sees no CUDA device; give workers GPUs with "
            "runtime.num_gpus_per_worker > 0, or set runtime.device=cpu"
        )
    return torch.device(name)


def build_resident(cfg: ExperimentConfig, data: FederatedData) -> Resident:
    base = load_dual_encoder(str(pretrained_base_dir(cfg, data)))
    for p in base.parameters():
        p.requires_grad_(False)
    lc = cfg.lora
    configs = {
        adapter_name(r): lora_config(r, lc.alpha * r / lc.r, lc.dropout, lc.target_modules, lc.modules_to_save)
        for r in ranks_in_use(cfg)
    }
    # peft initialises lora_A randomly; make the initial global adapter a function of the seed.
    torch.manual_seed(cfg.seed)
    model = add_lora(base, configs)
    model.eval()
    device = resolve_device(cfg.runtime.device)
    return Resident(model.to(device), data, device)


def initial_adapter(resident: Resident, cfg: ExperimentConfig) -> Tensors:
    return adapter_state(resident.model, adapter_name(max_rank(cfg)))


def for_client(global_adapter: Tensors, rank: int, r_max: int) -> Tensors:
    return global_adapter if rank == r_max else lora_agg.truncate_lora(global_adapter, rank)


def _flat_optimizer_state(opt: torch.optim.Optimizer) -> Tensors:
    out = {}
    for idx, st in opt.state_dict()["state"].items():
        for name, value in st.items():
            out[f"optim.{idx}.{name}"] = torch.as_tensor(value).detach().to("cpu", copy=True)
    return out


def _load_optimizer_state(opt: torch.optim.Optimizer, flat: Tensors) -> None:
    sd = opt.state_dict()
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value.clone()
    sd["state"] = state
    opt.load_state_dict(sd)


def local_train(
    resident: Resident,
    cfg: ExperimentConfig,
    client_id: int,
    seed: int,
    start: Tensors,
    client_state: dict,
    prox_mu: float = 0.0,
) -> tuple[Tensors, dict[str, float]]:
    """Train one client's adapter from `start` on its private data. Updates
    `client_state` (optimizer moments, personal adapter) in place."""
    rank = client_rank(cfg, client_id)
    name = adapter_name(rank)
    model = resident.model
    activate(model, name)
    load_adapter_state(model, name, start)
    params = trainable_parameters(model)
    anchors = [p.detach().clone() for p in params] if prox_mu > 0 else None
    t = cfg.train
    opt = torch.optim.AdamW(params, lr=t.lr, weight_decay=t.weight_decay)
    if t.keep_optimizer_state and "optimizer" in client_state:
        _load_optimizer_state(opt, client_state["optimizer"])
    data = resident.data.client(client_id)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(t.local_epochs):
        order = torch.randperm(len(data), generator=gen)
        for s in range(0, len(order), t.batch_size):
            b = order[s : s + t.batch_size]
            if len(b) < 2:  # a contrastive loss needs at least one negative
                continue
            dev = resident.device
            loss = contrastive_loss(model, data.images[b].to(dev), data.input_ids[b].to(dev), data.attention_mask[b].to(dev))
            if anchors is not None:
                loss = loss + prox_mu / 2 * sum(((p - a) ** 2).sum() for p, a in zip(params, anchors))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    model.eval()
    tensors = adapter_state(model, name)
    if t.keep_optimizer_state:
        client_state["optimizer"] = _flat_optimizer_state(opt)
    client_state["adapter"] = tensors  # the client's personal adapter after this round
    metrics = {"train_loss": sum(losses) / len(losses) if losses else float("nan"), "rank": float(rank)}
    return tensors, metrics


# --- adapter folds -------------------------------------------------------------------

def adapter_fold_add(acc: agg.WeightedSum, tensors: Tensors, weight: float, cfg: ExperimentConfig) -> agg.WeightedSum:
    mode = cfg.algorithm.lora_aggregation
    if mode == "product":
        return lora_agg.product_add(acc, tensors, weight, scaling(cfg))
    if mode == "hetlora":
        return agg.ws_add(acc, lora_agg.pad_lora(tensors, max_rank(cfg)), weight)
    return agg.ws_add(acc, tensors, weight)


def adapter_fold_result(acc: agg.WeightedSum, cfg: ExperimentConfig) -> Tensors:
    mean = agg.ws_mean(acc)
    if cfg.algorithm.lora_aggregation == "product":
        return lora_agg.product_to_lora(mean, max_rank(cfg), scaling(cfg))
    return mean


# --- evaluation ----------------------------------------------------------------------

@torch.no_grad()
def evaluate_dual_encoder(model, data: FederatedData, batch_size: int, device=torch.device("cpu")) -> dict[str, float]:
    """Zero-shot accuracy against class prompts and Recall@1 both ways on the test split.
    Identical captions are indistinguishable, so retrieving any pair whose caption text
    equals the query's own caption counts as a hit."""
    test = data.test
    chunks = range(0, len(test), batch_size)
    img = torch.cat([encode_images(model, test.images[s : s + batch_size].to(device)).cpu() for s in chunks])
    txt = torch.cat(
        [
            encode_texts(
                model, test.input_ids[s : s + batch_size].to(device), test.attention_mask[s : s + batch_size].to(device)
            ).cpu()
            for s in chunks
        ]
    )
    metrics = {}
    if data.class_prompts is not None:  # None: the data has no labels, so no zero-shot accuracy
        prompt_ids, prompt_mask = data.class_prompts
        classes = encode_texts(model, prompt_ids.to(device), prompt_mask.to(device)).cpu()
        metrics["accuracy"] = (img @ classes.T).argmax(1).eq(test.labels).float().mean().item()
    same_caption = (test.input_ids[:, None, :] == test.input_ids[None, :, :]).all(-1)
    sim = img @ txt.T
    i2t = same_caption[torch.arange(len(test)), sim.argmax(1)].float().mean().item()
    t2i = same_caption[torch.arange(len(test)), sim.T.argmax(1)].float().mean().item()
    return {**metrics, "i2t_r1": i2t, "t2i_r1": t2i}


def evaluate_adapter(resident: Resident, cfg: ExperimentConfig, adapter: Tensors) -> dict[str, float]:
    name = adapter_name(max_rank(cfg))
    activate(resident.model, name)
    load_adapter_state(resident.model, name, adapter)
    return evaluate_dual_encoder(resident.model, resident.data, cfg.eval.batch_size, resident.device)


def l2_norm(tensors: Tensors) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors.values())))
