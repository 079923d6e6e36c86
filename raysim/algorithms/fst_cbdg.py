"""FST-CBDG: federated self-training of a linear head on a frozen pretrained VLM with
class-balanced data generation (Yan & Guo, "Lightweight Unsupervised Federated Learning
with Pretrained Vision Language Model", arXiv 2404.11046).

Clients hold unlabelled images and weak hardware, so only a linear head over the frozen
image features is trained and only the head travels: C x d weights + C biases each way.

- The server encodes the class prompts with the frozen text tower and initialises the
  head from those class text features, so round 1 starts from the zero-shot classifier.
  The text features are a constant of the frozen model, delivered once with it (here:
  each worker's resident encodes the same prompts with the same frozen tower), so they
  are not re-sent every round.
- A client encodes its images once (cached in its worker-side state), starts its soft
  pseudo-labels from the zero-shot predictions and, every time it is sampled, moves them
  towards the received global head's predictions (moving average, `label_momentum`).
- Local loss: soft-label cross-entropy on the real features plus `synthetic_weight` times
  cross-entropy on synthetic features normalize(t_c + sigma * N(0, I)), generated so every
  class reaches a common count however skewed the client's pseudo-labels are.
- The driver takes the sample-weighted mean of the heads (FedAvg).

`labels: truth` trains the same head on the true labels instead (supervised FedAvg of the
head, the paper's upper reference); it never runs in the unsupervised setting.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal, Optional

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import save_file

from actors.protocol import Broadcast, ClientContext, ClientResult, Tensors
from models.clip import encode_images, encode_texts, load_dual_encoder
from raysim.aggregate import weighted as agg
from raysim.algorithms import options_of
from raysim.algorithms.common import FromConfig
from raysim.config import ExperimentConfig
from raysim.data import FederatedData
from raysim.pretrain import pretrained_base_dir


class Options(BaseModel):
    """`algorithm.options` of fst_cbdg. The paper leaves the values marked (*) unconfirmed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # Inverse temperature of the zero-shot predictions and of the pseudo-labels (*: 100).
    label_scale: float = Field(100.0, gt=0)
    # Multiplier of the head's logits while training. Equal to label_scale, soft-label
    # self-training starts at its fixed point (the head reproduces its own labels, zero
    # gradient); a smaller one makes the sharper labels pull the head towards the images.
    head_scale: float = Field(1.0, gt=0)
    label_momentum: float = Field(0.9, ge=0, le=1, description="weight of the old soft labels (*)")
    generation: bool = True
    noise_sigma: float = Field(0.1, ge=0, description="per-dimension std of the feature noise (*)")
    synthetic_weight: float = Field(1.0, ge=0, description="weight of the generated-data loss (*)")
    # Every class is filled up to this many (real + synthetic) examples; None: the client's
    # largest pseudo-class count (*).
    balance_target: Optional[int] = Field(None, ge=1)
    labels: Literal["pseudo", "truth"] = "pseudo"


# --- pure functions (hand-tested in tests/test_fst_cbdg.py) ------------------------------

def update_soft_labels(labels: torch.Tensor, probs: torch.Tensor, momentum: float) -> torch.Tensor:
    """Moving average of soft labels: the old labels keep weight `momentum`."""
    return momentum * labels + (1.0 - momentum) * probs


def balanced_counts(hard_labels: torch.Tensor, num_classes: int, target: int | None = None) -> torch.Tensor:
    """How many synthetic examples each class needs so that real + synthetic reach `target`
    (default: the largest class count). Classes already above the target get none."""
    counts = torch.bincount(hard_labels, minlength=num_classes)
    goal = int(counts.max()) if target is None else target
    return (goal - counts).clamp(min=0)


def generate_features(
    text_features: torch.Tensor, counts: torch.Tensor, sigma: float, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """counts[c] unit vectors normalize(t_c + sigma * N(0, I)) per class c, with labels."""
    labels = torch.repeat_interleave(torch.arange(len(counts)), counts)
    noise = torch.randn(len(labels), text_features.shape[1], generator=gen)
    return F.normalize(text_features[labels] + sigma * noise, dim=-1), labels


def head_logits(head: Tensors, features: torch.Tensor) -> torch.Tensor:
    return features @ head["weight"].T + head["bias"]


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return -(targets * F.log_softmax(logits, dim=-1)).sum(-1).mean()


@torch.no_grad()
def image_features(model, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([encode_images(model, images[s : s + batch_size]) for s in range(0, len(images), batch_size)])


def accuracy(logits: torch.Tensor, labels: torch.Tensor) -> float:
    return logits.argmax(-1).eq(labels).float().mean().item()


def train_head(
    head: Tensors,
    real: torch.Tensor,
    targets: torch.Tensor,
    synthetic: torch.Tensor,
    synthetic_labels: torch.Tensor,
    opts: Options,
    train_cfg,
    gen: torch.Generator,
) -> tuple[Tensors, float]:
    """Local epochs over the real features; every step also takes a synthetic batch in
    proportion, so one epoch covers both sets once. Returns a new head and the mean loss."""
    params = {k: t.clone().requires_grad_(True) for k, t in head.items()}
    # A fresh optimizer every round: the client restarts from the global head anyway.
    opt = torch.optim.AdamW(params.values(), lr=train_cfg.lr, weight_decay=train_cfg.weight_decay)
    n, bs = len(real), train_cfg.batch_size
    steps = -(-n // bs)
    syn_bs = -(-len(synthetic) // steps)
    losses = []
    for _ in range(train_cfg.local_epochs):
        order, syn_order = torch.randperm(n, generator=gen), torch.randperm(len(synthetic), generator=gen)
        for step in range(steps):
            b = order[step * bs : (step + 1) * bs]
            loss = soft_cross_entropy(opts.head_scale * head_logits(params, real[b]), targets[b])
            s = syn_order[step * syn_bs : (step + 1) * syn_bs]
            if len(s) and opts.synthetic_weight > 0:
                logits = opts.head_scale * head_logits(params, synthetic[s])
                loss = loss + opts.synthetic_weight * F.cross_entropy(logits, synthetic_labels[s])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    return {k: p.detach() for k, p in params.items()}, sum(losses) / len(losses)


# --- the frozen model a worker (or the driver) keeps --------------------------------------

@dataclass
class Resident:
    model: object  # the frozen dual encoder
    data: FederatedData
    text_features: torch.Tensor  # (C, d) unit class-prompt features


def build_frozen(cfg: ExperimentConfig, data: FederatedData) -> Resident:
    model = load_dual_encoder(str(pretrained_base_dir(cfg, data)))
    for p in model.parameters():
        p.requires_grad_(False)
    with torch.no_grad():
        text = encode_texts(model, *data.class_prompts)
    return Resident(model, data, text)


class FstCbdg(FromConfig):
    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.opts: Options = options_of(cfg)

    @cached_property
    def _eval_resident(self) -> Resident:
        return build_frozen(self.cfg, self.data)

    @cached_property
    def _test_features(self) -> torch.Tensor:
        return image_features(self._eval_resident.model, self.data.test.images, self.cfg.eval.batch_size)

    # --- driver side ----------------------------------------------------------------
    def init_server(self) -> Tensors:
        text = self._eval_resident.text_features
        return {"weight": text.clone(), "bias": torch.zeros(len(text))}

    def broadcast(self, state: Tensors, round: int, client_ids: list[int]) -> Broadcast:
        return Broadcast(round=round, tensors=state)

    def finalize(self, state: Tensors, acc: agg.WeightedSum) -> Tensors:
        return agg.ws_mean(acc)

    def evaluate(self, state: Tensors) -> dict[str, float]:
        x, y = self._test_features, self.data.test.labels
        zero_shot = x @ self._eval_resident.text_features.T
        return {"accuracy": accuracy(head_logits(state, x), y), "zero_shot_accuracy": accuracy(zero_shot, y)}

    def save_final(self, state: Tensors, run_dir: Path) -> None:
        """run_dir/head.safetensors: logits = image_features @ weight.T + bias, the image
        features being the frozen base's (pretrained_base_dir of this config)."""
        save_file({k: t.contiguous() for k, t in state.items()}, str(run_dir / "head.safetensors"))

    # --- worker side ----------------------------------------------------------------
    def build_resident(self) -> Resident:
        return build_frozen(self.cfg, self.data)

    def client_reference(self, msg: Broadcast, client_id: int) -> Tensors:
        """A client returns the head it was sent, trained: screening, DP and SecAgg apply."""
        return msg.tensors

    def _client_cache(self, ctx: ClientContext) -> dict[str, torch.Tensor]:
        """The client's frozen image features and soft labels, computed on its first visit."""
        if "cache" not in ctx.state:
            res = ctx.resident
            feats = image_features(res.model, res.data.client(ctx.client_id).images, self.cfg.eval.batch_size)
            zero_shot = F.softmax(self.opts.label_scale * feats @ res.text_features.T, dim=-1)
            ctx.state["cache"] = {"features": feats, "soft_labels": zero_shot}
        return ctx.state["cache"]

    def _targets(self, ctx: ClientContext, cache: dict, head: Tensors) -> torch.Tensor:
        if self.opts.labels == "truth":
            return F.one_hot(ctx.resident.data.client(ctx.client_id).labels, len(head["bias"])).float()
        with torch.no_grad():
            probs = F.softmax(self.opts.label_scale * head_logits(head, cache["features"]), dim=-1)
        labels = update_soft_labels(cache["soft_labels"], probs, self.opts.label_momentum)
        ctx.state["cache"] = {"features": cache["features"], "soft_labels": labels}
        return labels

    def client_step(self, ctx: ClientContext, msg: Broadcast) -> ClientResult:
        opts, text = self.opts, ctx.resident.text_features
        cache = self._client_cache(ctx)
        targets = self._targets(ctx, cache, msg.tensors)
        gen = torch.Generator().manual_seed(ctx.seed)
        counts = balanced_counts(targets.argmax(-1), len(text), opts.balance_target)
        if not opts.generation:
            counts = torch.zeros_like(counts)
        synthetic, synthetic_labels = generate_features(text, counts, opts.noise_sigma, gen)
        head, loss = train_head(
            msg.tensors, cache["features"], targets, synthetic, synthetic_labels, opts, self.cfg.train, gen
        )
        true = ctx.resident.data.client(ctx.client_id).labels  # for monitoring; trained on only with labels: truth
        metrics = {
            "train_loss": loss,
            "synthetic": float(len(synthetic)),
            "pseudo_label_accuracy": accuracy(targets, true),
        }
        return ClientResult(ctx.client_id, len(cache["features"]), head, metrics)

    def zero(self, msg: Broadcast) -> agg.WeightedSum:
        return agg.ws_zero()

    def accumulate(self, acc: agg.WeightedSum, result: ClientResult) -> agg.WeightedSum:
        return agg.ws_add(acc, result.tensors, float(result.num_examples))

    def merge(self, a: agg.WeightedSum, b: agg.WeightedSum) -> agg.WeightedSum:
        return agg.ws_merge(a, b)


ALGORITHM = FstCbdg
