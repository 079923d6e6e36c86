"""CreamFL: contrastive representation ensemble (Yu et al., ICLR 2023, arXiv 2302.08888).

Heterogeneous clients -- image-only (image tower + digit classifier), text-only (text
tower + digit classifier) and image-text (small dual encoder, contrastive) -- with
different architectures (models/hetero.py) teach a larger server dual encoder without
sharing weights: only representations of a public set of N image-caption pairs travel.

Public set: N pairs drawn (seeded) from the data's `pretrain` split, which clients never
own; the public ids 0..N-1 are positions in that draw. Set `data.pretrain_class_share`
to cover every digit (configs/creamfl.yaml uses a uniform share).

One round, in the engine's terms (state = server weights + the global public
representations G_I, G_T + a round counter):
- `broadcast`: G_I, G_T (N x d each, L2-normalised), put in the object store once.
- `client_step`: the client (its own weights persist in `ctx.state["model"]`, clients
  are never averaged) trains on its private data -- cross-entropy on digit labels for
  uni-modal clients, the CLIP loss for image-text ones -- plus, on a public batch per
  step, `reg_weight` x (intra + inter) for each modality it has:
    intra (MOON-style): logits [h_j.G_same_j, h_j.h~_j] / tau, target 0, h~ from the
        client's frozen round-start model (its public features are computed once before
        training: the copy is frozen, so that equals running the copy per batch);
    inter: logits h_j.G_other_j' / tau over all j', target j.
  It then uploads its public-set representations, N x d per modality it has.
- fold (`zero/accumulate/merge`): per public sample j and modality, client k scores
  s_kj = log_softmax_j'(L_kj.G_other_j')[j] (no temperature), weights softmax_k(s_kj),
  A_j = sum_k w_kj L_kj -- as a running max / running sum of exp / running weighted sum,
  so the driver never holds more than one N x d matrix per modality and partials merge
  like logsumexp states (`ensemble: mean` sets every score to 0: a plain mean).
- `finalize`: the server distils towards A: distill_weight x [MSE(f_I, A_I) + MSE(f_T, A_T)],
  each term once and only for a modality some client uploaded (the official code adds
  the terms twice when all client kinds are present; not copied). Then comes the
  server's contrastive pass over the public set, which the paper runs at the start of
  the NEXT round, and its encoding of the public set into the next G. Doing it here
  keeps `broadcast` a pure read of the state; the server sees the same sequence of
  updates as in the paper, and an evaluation after round r sees the server after
  r+1 public passes and r distillations (round 0: after one public pass). The
  public-only baseline therefore gets exactly as many public passes.

`server_only: true` is the public-only baseline (clients do nothing and nothing
travels); `regularizer: false` drops intra/inter (clients then need nothing from the
server: bytes down 0; the broadcast still carries G for the driver-side scoring fold).

Server and clients start a fresh AdamW at every pass/round (`train.keep_optimizer_state`
is not used): moments from a previous round belong to other targets, and a fresh
optimizer keeps `--resume` exact with only the weights checkpointed. The server's size
comes from the `model` section (a ViT + transformer text tower of `hidden_size`,
`num_layers`, `num_heads`, `intermediate_size`, `patch_size`; d = `projection_dim`);
clients use `train.lr`, `train.batch_size`, `train.local_epochs`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator

from actors.protocol import Broadcast, ClientContext, ClientResult, Tensors
from models import hetero
from raysim.algorithms import options_of
from raysim.algorithms.common import FromConfig
from raysim.config import ConfigError, ExperimentConfig
from raysim.data import FederatedData, PairData

KINDS = ("image", "text", "image_text")
MODALITIES = ("image", "text")
OTHER = {"image": "text", "text": "image"}
# Architectures (image tower, text tower) per client kind; a client takes the entry at
# its index within its kind modulo the length, so each kind mixes two architectures.
ARCHS = {
    "image": [("cnn", None), ("vit", None)],
    "text": [(None, "gru"), (None, "transformer")],
    "image_text": [("cnn", "transformer"), ("vit", "gru")],
}
NUM_CLASSES = 10
_PUBLIC, _CLIENT_INIT, _SERVER_INIT, _PUBLIC_PASS, _DISTILL = 0xC0B1, 0xC11E, 0x5E4F, 0x9A55, 0xD157  # seed stream tags


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    # Fractions of clients.total per kind; ids are assigned in blocks in the order
    # image, text, image_text, with counts rounded by largest remainder.
    kinds: dict[str, float] = Field(default_factory=lambda: {"image": 0.35, "text": 0.35, "image_text": 0.3})
    public_size: int = Field(256, ge=2, description="N: public pairs, drawn from the pretrain split")
    tau: float = Field(0.5, gt=0, description="temperature of the intra/inter regulariser")
    reg_weight: float = Field(0.5, ge=0, description="weight of (intra + inter) in local training")
    distill_weight: float = Field(0.3, ge=0, description="weight of the server's MSE distillation")
    server_epochs: int = Field(1, ge=1, description="server contrastive passes over the public set per round")
    distill_epochs: int = Field(1, ge=1, description="server distillation passes per round")
    server_lr: float = Field(1e-3, gt=0)
    server_batch_size: int = Field(64, ge=2)
    public_batch_size: int = Field(32, ge=1, description="public pairs per local step for the regulariser")
    client_width: int = Field(32, ge=4, description="hidden width of client towers (the server's is model.hidden_size)")
    ensemble: Literal["weighted", "mean"] = "weighted"
    regularizer: bool = True
    server_only: bool = False

    @field_validator("kinds")
    @classmethod
    def _fractions(cls, kinds: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(kinds) - set(KINDS))
        if unknown:
            raise ValueError(f"unknown client kinds {unknown}; known kinds: {', '.join(KINDS)}")
        if any(f < 0 for f in kinds.values()) or abs(sum(kinds.values()) - 1.0) > 1e-6:
            raise ValueError(f"kinds are fractions of clients.total: each >= 0, summing to 1, got {kinds}")
        return kinds


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0] >> 1)


def kind_blocks(fractions: dict[str, float], total: int) -> list[str]:
    """The kind of every client id: largest-remainder counts, contiguous blocks."""
    exact = {k: fractions.get(k, 0.0) * total for k in KINDS}
    counts = {k: int(v) for k, v in exact.items()}
    by_remainder = sorted(KINDS, key=lambda k: (-(exact[k] - counts[k]), KINDS.index(k)))
    for k in by_remainder[: total - sum(counts.values())]:
        counts[k] += 1
    return [k for k in KINDS for _ in range(counts[k])]


def public_set(data: FederatedData, size: int, seed: int) -> PairData:
    pool = data.pretrain_idx
    if size > len(pool):
        raise ConfigError(
            f"algorithm.options.public_size {size} exceeds the {len(pool)} pairs of the pretrain split; "
            "lower it or raise data.pretrain_class_share"
        )
    rng = np.random.default_rng([seed, _PUBLIC])
    return data.all.subset(rng.choice(pool, size=size, replace=False))


# --- the ensemble fold ---------------------------------------------------------------


@dataclass(frozen=True)
class Ensemble:
    """Running state of A_j = sum_k softmax_k(s_kj) L_kj for one modality. Immutable:
    every operation returns a new value. Float64 so merge order moves only the last bits."""

    max: torch.Tensor | None = None  # (N,) max_k s_kj so far
    sumexp: torch.Tensor | None = None  # (N,) sum_k exp(s_kj - max_j)
    wsum: torch.Tensor | None = None  # (N, d) sum_k exp(s_kj - max_j) L_kj
    count: int = 0


def pair_scores(reps: torch.Tensor, other_global: torch.Tensor) -> torch.Tensor:
    """s_j = log-softmax over j' of reps_j . G_other_j', taken at the true pair j."""
    logits = reps.double() @ other_global.double().T
    return torch.log_softmax(logits, dim=1).diagonal().clone()


def ens_add(ens: Ensemble, reps: torch.Tensor, scores: torch.Tensor) -> Ensemble:
    one = Ensemble(scores.double().clone(), torch.ones_like(scores, dtype=torch.float64), reps.double().clone(), 1)
    return ens_merge(ens, one)


def ens_merge(a: Ensemble, b: Ensemble) -> Ensemble:
    """Combine two partial states like two logsumexp's: rescale both to the joint max."""
    if not a.count:
        return b
    if not b.count:
        return a
    if a.wsum.shape != b.wsum.shape:
        raise ValueError(f"representations of different shapes: {tuple(a.wsum.shape)} vs {tuple(b.wsum.shape)}")
    m = torch.maximum(a.max, b.max)
    ea, eb = torch.exp(a.max - m), torch.exp(b.max - m)
    return Ensemble(m, a.sumexp * ea + b.sumexp * eb, a.wsum * ea[:, None] + b.wsum * eb[:, None], a.count + b.count)


def ens_result(ens: Ensemble) -> torch.Tensor:
    return (ens.wsum / ens.sumexp[:, None]).to(torch.float32)


@dataclass(frozen=True)
class Acc:
    """The round's fold: the global representations clients are scored against (from the
    broadcast) and one Ensemble per modality."""

    globals: Tensors
    weighted: bool
    parts: dict[str, Ensemble] = field(default_factory=dict)


# --- losses --------------------------------------------------------------------------


def intra_loss(h: torch.Tensor, g_same: torch.Tensor, h_start: torch.Tensor, tau: float) -> torch.Tensor:
    """MOON-style: rows of h pulled to the same-modality global feature (positive, index 0)
    and pushed from the round-start model's feature. All inputs (B, d), L2-normalised."""
    logits = torch.stack([(h * g_same).sum(-1), (h * h_start).sum(-1)], dim=1) / tau
    return F.cross_entropy(logits, torch.zeros(len(h), dtype=torch.long))


def inter_loss(h: torch.Tensor, g_other: torch.Tensor, idx: torch.Tensor, tau: float) -> torch.Tensor:
    """Row b of h (public sample idx[b]) must pick its own pair among all N other-modality
    global features g_other (N, d)."""
    return F.cross_entropy(h @ g_other.T / tau, idx)


def private_loss(model: hetero.HeteroModel, kind: str, batch: PairData) -> torch.Tensor:
    if kind == "image":
        return F.cross_entropy(model.classify_images(batch.images), batch.labels)
    if kind == "text":
        return F.cross_entropy(model.classify_texts(batch.input_ids, batch.attention_mask), batch.labels)
    return hetero.contrastive_loss(model, batch.images, batch.input_ids, batch.attention_mask)


def encode(model: hetero.HeteroModel, pairs: PairData, modality: str) -> torch.Tensor:
    if modality == "image":
        return model.encode_images(pairs.images)
    return model.encode_texts(pairs.input_ids, pairs.attention_mask)


@torch.no_grad()
def encode_public(model: hetero.HeteroModel, public: PairData, batch_size: int = 256) -> Tensors:
    """N x d L2-normalised features of the public set, per modality the model has."""
    model.eval()
    chunks = [public.subset(np.arange(s, min(s + batch_size, len(public)))) for s in range(0, len(public), batch_size)]
    return {m: torch.cat([encode(model, c, m) for c in chunks]) for m in model.modalities}


def regulariser(model, public: PairData, idx: torch.Tensor, globals_: Tensors, start: Tensors, tau: float):
    """intra + inter, summed over the modalities the client has, on public samples idx."""
    batch = public.subset(idx)
    total = torch.zeros(())
    for m in model.modalities:
        h = encode(model, batch, m)
        total = total + intra_loss(h, globals_[m][idx], start[m][idx], tau) + inter_loss(h, globals_[OTHER[m]], idx, tau)
    return total


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


def local_train(model, kind: str, data: PairData, public: PairData, globals_: Tensors | None, cfg, opts, seed: int):
    """Private loss plus, when `globals_` is given, the weighted regulariser on a fresh
    random public batch each step. Returns the mean private and regulariser losses."""
    t = cfg.train
    start = encode_public(model, public) if globals_ is not None else None  # the frozen round-start model
    opt = torch.optim.AdamW(model.parameters(), lr=t.lr, weight_decay=t.weight_decay)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses, regs = [], []
    for _ in range(t.local_epochs):
        order = torch.randperm(len(data), generator=gen)
        for s in range(0, len(order), t.batch_size):
            b = order[s : s + t.batch_size]
            if kind == "image_text" and len(b) < 2:
                continue  # a contrastive batch of one pair has nothing to contrast
            loss = private_loss(model, kind, data.subset(b))
            losses.append(loss.item())
            if globals_ is not None:
                idx = torch.randperm(len(public), generator=gen)[: opts.public_batch_size]
                reg = regulariser(model, public, idx, globals_, start, opts.tau)
                regs.append(reg.item())
                loss = loss + opts.reg_weight * reg
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    model.eval()
    return {"train_loss": _mean(losses), "reg_loss": _mean(regs)}


# --- server training -----------------------------------------------------------------


def _batches(n: int, batch_size: int, gen: torch.Generator):
    order = torch.randperm(n, generator=gen)
    return [order[s : s + batch_size] for s in range(0, n, batch_size) if len(order[s : s + batch_size]) >= 2]


def server_public_pass(model: hetero.HeteroModel, public: PairData, opts: Options, seed: int) -> float:
    """`server_epochs` passes of the CLIP loss over the public set; returns the mean loss."""
    opt = torch.optim.AdamW(model.parameters(), lr=opts.server_lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(opts.server_epochs):
        for b in _batches(len(public), opts.server_batch_size, gen):
            batch = public.subset(b)
            loss = hetero.contrastive_loss(model, batch.images, batch.input_ids, batch.attention_mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    model.eval()
    return _mean(losses)


def server_distill(model: hetero.HeteroModel, public: PairData, targets: Tensors, opts: Options, seed: int) -> float:
    """distill_weight x sum over the modalities in `targets` of MSE(server feature, A)."""
    opt = torch.optim.AdamW(model.parameters(), lr=opts.server_lr)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(opts.distill_epochs):
        for b in _batches(len(public), opts.server_batch_size, gen):
            batch = public.subset(b)
            loss = sum(F.mse_loss(encode(model, batch, m), targets[m][b]) for m in sorted(targets))
            loss = opts.distill_weight * loss
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            losses.append(loss.item())
    model.eval()
    return _mean(losses)


@torch.no_grad()
def retrieval_metrics(model: hetero.HeteroModel, data: FederatedData, batch_size: int) -> dict[str, float]:
    """Image<->text Recall@1/5 and zero-shot digit accuracy on the test split.

    Captions repeat, and identical captions cannot be told apart, so (as in
    raysim.lora.evaluate) a retrieved item is a hit when its caption text equals the query's
    own. Image->text ranks the distinct captions: identical captions have identical
    features, so ranking all copies would fill the top 5 with one caption and make
    R@5 equal R@1. R@1 is the same either way."""
    test = data.test
    feats = encode_public(model, test, batch_size)
    img, txt = feats["image"], feats["text"]
    captions, own = torch.unique(test.input_ids, dim=0, return_inverse=True)
    first = torch.stack([torch.nonzero(own == c)[0, 0] for c in range(len(captions))])
    same_caption = own[:, None] == own[None, :]  # (queries, test items)
    out = {}
    for k in (1, 5):
        top_caption = (img @ txt[first].T).topk(min(k, len(first)), dim=1).indices  # (images, k) caption ids
        out[f"i2t_r{k}"] = (top_caption == own[:, None]).any(1).float().mean().item()
        top_image = (txt @ img.T).topk(min(k, len(test)), dim=1).indices
        out[f"t2i_r{k}"] = same_caption.gather(1, top_image).any(1).float().mean().item()
    prompts = model.encode_texts(*data.class_prompts)
    out["accuracy"] = (img @ prompts.T).argmax(1).eq(test.labels).float().mean().item()
    return out


# --- the algorithm -------------------------------------------------------------------


@dataclass
class Resident:
    data: FederatedData
    public: PairData


def _clone(tensors: Tensors) -> Tensors:
    return {k: t.detach().clone() for k, t in tensors.items()}


class CreamFL(FromConfig):
    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.opts: Options = options_of(cfg)
        self.kind_of_client = kind_blocks(self.opts.kinds, cfg.clients.total)

    @cached_property
    def public(self) -> PairData:
        return public_set(self.data, self.opts.public_size, self.cfg.seed)

    @cached_property
    def _server(self) -> hetero.HeteroModel:
        """The driver's server model; weights are loaded from the state before each use."""
        m = self.cfg.model
        return hetero.server_model(
            dim=m.projection_dim,
            vocab_size=self.data.tokenizer.vocab_size,
            max_len=m.max_text_len,
            image_size=self.cfg.data.image_size,
            patch=m.patch_size,
            hidden=m.hidden_size,
            layers=m.num_layers,
            heads=m.num_heads,
            ffn=m.intermediate_size,
            seed=_seed(self.cfg.seed, _SERVER_INIT),
        )

    def client_model(self, client_id: int) -> hetero.HeteroModel:
        """The client's architecture with its seeded initial weights."""
        kind = self.kind_of_client[client_id]
        position = client_id - self.kind_of_client.index(kind)
        image_arch, text_arch = ARCHS[kind][position % len(ARCHS[kind])]
        c = self.cfg
        return hetero.client_model(
            image_arch,
            text_arch,
            dim=c.model.projection_dim,
            vocab_size=self.data.tokenizer.vocab_size,
            max_len=c.model.max_text_len,
            image_size=c.data.image_size,
            width=self.opts.client_width,
            num_classes=NUM_CLASSES,
            seed=_seed(c.seed, _CLIENT_INIT, client_id),
        )

    # --- driver side ----------------------------------------------------------------
    def _advance(self, server_weights: Tensors, targets: Tensors, round: int) -> dict[str, Tensors]:
        """Distil towards `targets` (if any), one public pass, encode the public set."""
        model = self._server
        model.load_state_dict(server_weights)
        if targets:
            server_distill(model, self.public, targets, self.opts, _seed(self.cfg.seed, _DISTILL, round))
        loss = server_public_pass(model, self.public, self.opts, _seed(self.cfg.seed, _PUBLIC_PASS, round + 1))
        return {
            "server": _clone(model.state_dict()),
            "global": encode_public(model, self.public),
            "meta": {"round": torch.tensor(round), "public_loss": torch.tensor(loss)},
        }

    def init_server(self) -> dict[str, Tensors]:
        return self._advance(_clone(self._server.state_dict()), {}, 0)

    def broadcast(self, state: dict[str, Tensors], round: int, client_ids: list[int]) -> Broadcast:
        if self.opts.server_only:
            return Broadcast(round=round, tensors={})
        return Broadcast(round=round, tensors=dict(state["global"]))

    def finalize(self, state: dict[str, Tensors], acc: Acc) -> dict[str, Tensors]:
        targets = {m: ens_result(e) for m, e in sorted(acc.parts.items()) if e.count}
        return self._advance(state["server"], targets, int(state["meta"]["round"]) + 1)

    def evaluate(self, state: dict[str, Tensors]) -> dict[str, float]:
        model = self._server
        model.load_state_dict(state["server"])
        metrics = retrieval_metrics(model, self.data, self.cfg.eval.batch_size)
        metrics["server_public_loss"] = float(state["meta"]["public_loss"])
        return metrics

    def state_tensors(self, state: dict[str, Tensors]) -> Tensors:
        return {f"{g}/{k}": t for g, ts in state.items() for k, t in ts.items()}

    def load_state_tensors(self, tensors: Tensors) -> dict[str, Tensors]:
        state: dict[str, Tensors] = {}
        for key, t in tensors.items():
            g, k = key.split("/", 1)
            state.setdefault(g, {})[k] = t
        return state

    # --- worker groups (raysim/run/groups.py): the client kinds, each with its own architectures
    def client_families(self) -> list[str]:
        return list(KINDS)

    def client_family(self, client_id: int) -> str:
        return self.kind_of_client[client_id]

    # --- worker side ----------------------------------------------------------------
    def build_resident(self) -> Resident:
        return Resident(self.data, self.public)

    def client_data(self, client_id: int) -> PairData:
        return self.data.client(client_id)

    def bytes_down(self, msg: Broadcast, client_id: int) -> int:
        """G_I and G_T: every client uses both (same modality: intra, other: inter); none
        without the regulariser."""
        if not self.opts.regularizer:
            return 0
        return sum(t.numel() * t.element_size() for t in msg.tensors.values())

    def client_step(self, ctx: ClientContext, msg: Broadcast) -> ClientResult:
        model = self.client_model(ctx.client_id)
        if "model" in ctx.state:
            model.load_state_dict(ctx.state["model"])
        if self.opts.server_only:
            # The client keeps its (untrained) model but sends nothing. It must leave some
            # state: the state store writes nothing for an empty state while the engine
            # still records this round as the client's state version.
            ctx.state["model"] = _clone(model.state_dict())
            return ClientResult(ctx.client_id, 0, {}, {"train_loss": float("nan")})
        kind = self.kind_of_client[ctx.client_id]
        data = self.client_data(ctx.client_id)
        globals_ = msg.tensors if self.opts.regularizer else None
        metrics = local_train(model, kind, data, ctx.resident.public, globals_, self.cfg, self.opts, ctx.seed)
        ctx.state["model"] = _clone(model.state_dict())
        return ClientResult(ctx.client_id, len(data), encode_public(model, ctx.resident.public), metrics)

    def zero(self, msg: Broadcast) -> Acc:
        return Acc(dict(msg.tensors), self.opts.ensemble == "weighted")

    def accumulate(self, acc: Acc, result: ClientResult) -> Acc:
        parts = dict(acc.parts)
        for m, reps in sorted(result.tensors.items()):
            if m not in MODALITIES or reps.shape[0] != self.opts.public_size:
                raise ValueError(
                    f"client {result.client_id} uploaded {m!r} of shape {tuple(reps.shape)}; "
                    f"expected 'image'/'text' of {self.opts.public_size} x d"
                )
            scores = pair_scores(reps, acc.globals[OTHER[m]]) if acc.weighted else torch.zeros(len(reps))
            parts[m] = ens_add(parts.get(m, Ensemble()), reps, scores)
        return Acc(acc.globals, acc.weighted, parts)

    def merge(self, a: Acc, b: Acc) -> Acc:
        modalities = sorted(a.parts.keys() | b.parts.keys())
        parts = {m: ens_merge(a.parts.get(m, Ensemble()), b.parts.get(m, Ensemble())) for m in modalities}
        return Acc(a.globals or b.globals, a.weighted, parts)


ALGORITHM = CreamFL
