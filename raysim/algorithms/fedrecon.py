"""FedRecon: missing-modality reconstruction with a federated multimodal VAE (arXiv 2504.09941).

Clients hold images, captions or both (`modality_mix`, fixed per client), and within a
"both" client each sample misses one of its two modalities with probability
`missing_rate` (which one: a fair coin); no sample misses both. Every mask derives from
(seed, client id) alone, so a client has the same data in every round and on any worker.

Three phases, from the round number (`phase_of`):

- **A** (rounds 1..phase_a): each client trains the parts of the MVAE
  (models/mvae.py) its data allows -- the image encoder/decoder on the samples that
  hold an image, the text ones on those holding a caption, and the mapping networks T
  plus cross-reconstruction on the samples holding both -- with the negative ELBO.
  The driver averages every module over the clients that trained it, weighted by the
  number of samples holding that module's modality (a grouped fold: one weighted sum
  per module), so an image-only client never dilutes the text modules.
- **B** (next phase_b rounds): the global generator (encoders and decoders) is frozen
  and broadcast; clients with paired samples train only T against it (cross-
  reconstruction + sample-level alignment). Freezing is the paper's answer to
  generator drift under non-IID data.
- **C** (the rest): clients fill each missing modality with
  decoder(T(encoder(x_present))) (posterior means; text as the argmax tokens) and
  train the downstream classifier -- an MLP on the concatenated posterior means of the
  two (present or filled) inputs plus two flags saying which was observed, the frozen
  global encoders being the feature extractors -- averaged over all clients by sample count.

Local training under label skew (Dirichlet 0.1: a client holds one to four digits).
Every phase uses the same short local budget (configs/fedrecon.yaml: 2 epochs of 32,
fresh AdamW) over many rounds, and a restricted softmax (`restrict_penalty`,
models/mvae.py `restricted_log_prior`): caption tokens a client never has at a position,
and digit classes it has no example of, get a fixed logit penalty in its local loss, so
it does not spend its steps pushing down words and classes it knows nothing about.
Measured on this config, seed 0, image->caption digit accuracy of the global generator
after phases A+B: 0.000 with the former 3 epochs of 16 and no restriction (each client's
decoder named its own digits, 0.25 on the test split, and the mean named none); 0.32-0.36
with short rounds alone; 0.41-0.55 with both (0.53 with this config). Centrally (one client with all data) the
same model reaches 0.8-0.9 in a few rounds: what remains is the federation, chiefly the
digits with few paired samples anywhere (`pairs_per_digit`; docs/results.md).

`variant` gives the issue's comparisons on the same code path:
- `full`: the above.
- `zero_fill`: phases A and B as `full`; in C the missing modality's features are zeros.
- `no_mapping`: no T; re-encoding is the identity (cross-reconstruction decodes a sample
  of the source posterior directly, alignment pulls the two posteriors together) and
  filling is decoder(encoder(x_present)). With nothing to train against a frozen
  generator, phase B keeps training the VAE as in A (the same round budget).
- `no_frozen_generator`: in phase B clients train T *jointly* with their local copy of
  the generator (the full ELBO, as in A) and every module is averaged, so T is fitted to
  locally drifting decoders rather than a fixed global one.

What persists on the worker (`ctx.state["masks"]`) is the client's own record of which
samples miss which modality -- a property of its data, drawn once. Models do not
persist: every phase starts from the broadcast globals with a fresh optimizer (the
global model changes between rounds, so old Adam moments would be stale).

Evaluation (test split, driver side). The test samples miss modalities like the
federation does: each sample draws its holder type from `modality_mix`, and a "both"
sample misses one modality with probability `missing_rate`; missing modalities are filled
exactly as clients fill them (zeros for `zero_fill`). Metrics:
- `f1` (macro over the 10 digits), `accuracy`: the downstream classifier on that split;
  `f1_filled`: macro-F1 over the test samples with a filled modality only.
- `i2t_top1/5`, `t2i_top1/5`: retrieval of reconstructed vs true latents over the test
  samples (both modalities known): the query is the re-encoded latent T(mu_source)
  (mu_source itself for `no_mapping`), the gallery the true posterior means of the other
  modality; a hit at k if fewer than k gallery latents are strictly nearer (Euclidean)
  than the sample's own. Strictly: identical captions have identical latents, and a tie
  with a copy of the right caption is not a miss. Text carries only digit and template, so
  t2i can at best find the right digit among ~36 images: t2i values are low by nature.
- `xrec_img_mse` (per pixel, 8x8 grid in [-1, 1]) and `xrec_txt_err` (token error rate
  over the caption's tokens; the template words cannot be predicted from an image, so
  ~0.4 is a floor) and `xrec_digit_acc` (captions reconstructed from images that contain
  the right digit word): cross-modal reconstruction, what filling uses;
  `rec_img_mse`, `rec_txt_err`: each modality reconstructed from its own posterior mean.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator
from sklearn.metrics import f1_score
from torch import nn

from actors.protocol import Broadcast, ClientContext, ClientResult, Tensors
from models import mvae
from raysim.aggregate import grouped
from raysim.aggregate import weighted as agg
from raysim.aggregate.grouped import Groups, flatten, unflatten
from raysim.algorithms import options_of
from raysim.algorithms.common import FromConfig
from raysim.config import ConfigError, ExperimentConfig
from raysim.data import DIGIT_WORDS, PAD, PairData

KINDS = ("image_only", "text_only", "both")
CLASSIFIER = "classifier"
VAE_GROUPS = mvae.IMAGE_MODULES + mvae.TEXT_MODULES + mvae.MAPPING_MODULES
# The metric holding each module's fold weight: samples that hold the module's modality.
_WEIGHT_KEY = {**dict.fromkeys(mvae.IMAGE_MODULES, "n_image"), **dict.fromkeys(mvae.TEXT_MODULES, "n_text"),
               **dict.fromkeys(mvae.MAPPING_MODULES, "n_pair")}
_KIND_TAG, _SAMPLE_TAG, _TEST_TAG = 0xF3C0, 0xF3C1, 0xF3C2  # keep the mask streams apart


class Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    variant: Literal["full", "zero_fill", "no_mapping", "no_frozen_generator"] = "full"
    phase_a: int = Field(12, ge=1, description="rounds of joint VAE training")
    phase_b: int = Field(6, ge=1, description="rounds of mapping-network training against the frozen generator")
    # Fractions of clients holding only images, only captions, or both (exact counts, largest remainder).
    modality_mix: dict[str, float] = Field(default_factory=lambda: {"image_only": 0.2, "text_only": 0.2, "both": 0.6})
    # Per-sample: a sample of a "both" client misses one modality with this probability.
    # The issue studies 0.1-0.5; 0 (no sample-level missing) is allowed as a control.
    missing_rate: float = Field(0.3, ge=0.0, le=0.5)
    latent_dim: int = Field(16, ge=2)
    hidden_dim: int = Field(128, ge=8, description="width of the encoders and decoders")
    mapping_hidden: int = Field(64, ge=8, description="width of the mapping networks T")
    classifier_hidden: int = Field(64, ge=8)
    # Weight of the KL and alignment terms. The paper's MMVAE+ uses 1; on 1.4k digits that
    # collapses the text posterior (the digit word is worth ~log 10 nats, what encoding it
    # costs in KL): measured centrally (20 epochs, an earlier per-position text encoder),
    # beta 1 -> 0.71 downstream F1, beta 0.1 -> 0.99. Federated under Dirichlet 0.1 a client
    # sees few digits, so locally the digit is nearly constant and any KL weight pays to
    # drop it from z: beta 0.1 left image posteriors at variance ~0.5 (noise over signal)
    # and the decoders reading biases; the config uses 0.01.
    beta: float = Field(0.1, ge=0)
    # Restricted softmax in local training (models/mvae.py restricted_log_prior): logits of
    # the caption tokens (per position) and digit classes a client holds no example of get
    # -restrict_penalty. 0 turns it off.
    restrict_penalty: float = Field(5.0, ge=0)

    @field_validator("modality_mix")
    @classmethod
    def _valid_mix(cls, mix: dict[str, float]) -> dict[str, float]:
        if set(mix) != set(KINDS):
            raise ValueError(f"needs exactly the keys {', '.join(KINDS)}, got {sorted(mix)}")
        if any(f < 0 for f in mix.values()) or abs(sum(mix.values()) - 1.0) > 1e-6:
            raise ValueError(f"fractions must be >= 0 and sum to 1, got {mix}")
        return mix


class ScheduleError(ConfigError, ValueError):
    """No round is left for phase C (a ConfigError so the CLI prints it plainly)."""


def phase_of(round: int, phase_a: int, phase_b: int) -> str:
    """'A' for rounds 1..phase_a, 'B' for the next phase_b, 'C' after."""
    if round <= phase_a:
        return "A"
    return "B" if round <= phase_a + phase_b else "C"


# --- modality masks --------------------------------------------------------------------


def client_kinds(seed: int, num_clients: int, mix: dict[str, float]) -> list[str]:
    """The holder type of every client: exact counts (largest remainder of mix * clients)
    over a seeded permutation of the client ids."""
    exact = [mix[k] * num_clients for k in KINDS]
    counts = [int(x) for x in exact]
    by_remainder = sorted(range(len(KINDS)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in by_remainder[: num_clients - sum(counts)]:
        counts[i] += 1
    order = np.random.default_rng([seed, _KIND_TAG]).permutation(num_clients)
    kinds = [k for k, n in zip(KINDS, counts) for _ in range(n)]
    out = [""] * num_clients
    for position, client in enumerate(order):
        out[client] = kinds[position]
    return out


def sample_masks(kinds: list[str], p: float, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """(has_img, has_txt) per sample of the given holder types; a "both" sample misses
    one modality, chosen by a fair coin, with probability p."""
    kinds_arr = np.asarray(kinds)
    missing = rng.random(len(kinds)) < p
    which_img = rng.random(len(kinds)) < 0.5  # drawn for every sample: masks don't shift with p
    both = kinds_arr == "both"
    has_img = (kinds_arr == "image_only") | (both & ~(missing & which_img))
    has_txt = (kinds_arr == "text_only") | (both & ~(missing & ~which_img))
    return torch.from_numpy(has_img), torch.from_numpy(has_txt)


def client_masks(seed: int, client_id: int, kind: str, n: int, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    return sample_masks([kind] * n, p, np.random.default_rng([seed, _SAMPLE_TAG, client_id]))


def test_masks(seed: int, n: int, mix: dict[str, float], p: float) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng([seed, _TEST_TAG])
    kinds = rng.choice(KINDS, size=n, p=[mix[k] for k in KINDS]).tolist()
    return sample_masks(kinds, p, rng)


# --- data and models -------------------------------------------------------------------


@dataclass(frozen=True)
class Batch:
    """One split with its masks; missing inputs are blanked (zero pixels, PAD tokens) so
    nothing downstream can read them."""

    pixels: torch.Tensor  # (N, 64)
    ids: torch.Tensor  # (N, L)
    labels: torch.Tensor
    has_img: torch.Tensor
    has_txt: torch.Tensor
    true_pixels: torch.Tensor | None = None  # test split only: for reconstruction metrics
    true_ids: torch.Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])


def masked_batch(data: PairData, has_img: torch.Tensor, has_txt: torch.Tensor, keep_truth: bool = False) -> Batch:
    pixels, ids = mvae.image_pixels(data.images), data.input_ids
    blank_pixels = torch.where(has_img[:, None], pixels, torch.zeros_like(pixels))
    blank_ids = torch.where(has_txt[:, None], ids, torch.full_like(ids, PAD))
    truth = (pixels, ids) if keep_truth else (None, None)
    return Batch(blank_pixels, blank_ids, data.labels, has_img, has_txt, *truth)


def module_tensors(module: nn.Module) -> Tensors:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


@dataclass
class Resident:
    model: mvae.MVAE
    classifier: mvae.Classifier
    test: Batch

    def module(self, group: str) -> nn.Module:
        return self.classifier if group == CLASSIFIER else getattr(self.model, group)

    def load(self, groups: Groups) -> None:
        for g, tensors in groups.items():
            self.module(g).load_state_dict(tensors)


# --- local training --------------------------------------------------------------------


def _set_trainable(res: Resident, groups: set[str]) -> list[nn.Parameter]:
    """Freeze every module but `groups` (no wasted gradients); return their parameters."""
    params = []
    for g in res.model.group_names() + (CLASSIFIER,):
        module = res.module(g)
        module.requires_grad_(g in groups)
        if g in groups:
            params += list(module.parameters())
    return params


def _minibatches(n: int, cfg: ExperimentConfig, gen: torch.Generator):
    for _ in range(cfg.train.local_epochs):
        order = torch.randperm(n, generator=gen)
        for s in range(0, n, cfg.train.batch_size):
            yield order[s : s + cfg.train.batch_size]


def _fit(params: list[nn.Parameter], loss_fn, n: int, cfg: ExperimentConfig, gen: torch.Generator) -> float:
    """Mini-batch AdamW on `loss_fn(index)`; returns the mean loss (nan if no batch had one)."""
    # foreach: one fused update per step instead of one per tensor (the step is tiny, launches dominate)
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, foreach=True)
    losses = []
    for idx in _minibatches(n, cfg, gen):
        loss = loss_fn(idx)
        if not loss.requires_grad:  # no sample in this batch holds what the loss needs
            continue
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return sum(losses) / len(losses) if losses else float("nan")


def token_counts(batch: Batch, vocab: int) -> torch.Tensor:
    """(L, V): how often each token sits at each position in the client's own captions."""
    ids = batch.ids[batch.has_txt].T
    return torch.zeros(ids.shape[0], vocab).scatter_add_(1, ids, torch.ones(ids.shape))


def train_vae(res: Resident, groups: set[str], batch: Batch, opts: Options, mapping_only: bool, cfg, gen) -> float:
    model = res.model
    prior = mvae.restricted_log_prior(token_counts(batch, model.txt_dec.vocab), opts.restrict_penalty)

    def loss(idx):
        b = batch
        terms = mvae.elbo_terms(model, b.pixels[idx], b.ids[idx], b.has_img[idx], b.has_txt[idx], gen, prior)
        return mvae.mapping_loss(terms, opts.beta) if mapping_only else mvae.negative_elbo(terms, opts.beta)

    return _fit(_set_trainable(res, groups), loss, len(batch), cfg, gen)


def fill_features(model: mvae.MVAE, batch: Batch, zero_fill: bool) -> torch.Tensor:
    """Downstream features [mu_img, mu_txt, has_img, has_txt]: a missing modality is
    reconstructed from the present one and re-encoded, or (zero_fill) its half of the
    features is zero; the flags say which modality was observed, in every variant."""
    flags = torch.stack([batch.has_img, batch.has_txt], dim=1).float()
    if zero_fill:
        feats = mvae.features(model, batch.pixels, batch.ids)
        d = feats.shape[1] // 2
        return torch.cat([feats[:, :d] * flags[:, :1], feats[:, d:] * flags[:, 1:], flags], dim=1)
    pixels = torch.where(batch.has_img[:, None], batch.pixels, model.fill_image(batch.ids))
    ids = torch.where(batch.has_txt[:, None], batch.ids, model.fill_text(batch.pixels))
    return torch.cat([mvae.features(model, pixels, ids), flags], dim=1)


def train_classifier(res: Resident, batch: Batch, opts: Options, cfg, gen) -> float:
    feats = fill_features(res.model, batch, opts.variant == "zero_fill")
    prior = mvae.restricted_log_prior(torch.bincount(batch.labels, minlength=mvae.NUM_CLASSES), opts.restrict_penalty)
    return _fit(_set_trainable(res, {CLASSIFIER}), lambda idx: F.cross_entropy(res.classifier(feats[idx]) + prior, batch.labels[idx]),
                len(batch), cfg, gen)


# --- evaluation ------------------------------------------------------------------------


def retrieval_ranks(queries: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """For query i: how many gallery items are strictly nearer than gallery item i."""
    dist = torch.cdist(queries, gallery)
    return (dist < dist.diagonal()[:, None]).sum(1)


@torch.no_grad()
def generator_metrics(model: mvae.MVAE, test: Batch, digit_tokens: torch.Tensor) -> dict[str, float]:
    """`digit_tokens[c]`: the token id of digit c's word."""
    pixels, ids = test.true_pixels, test.true_ids
    post_img, post_txt = model.img_enc(pixels), model.txt_enc(ids)
    to_txt = model.reencode(post_img[0], post_img, to_text=True)[0]
    to_img = model.reencode(post_txt[0], post_txt, to_text=False)[0]
    out = {}
    for name, query, gallery in (("i2t", to_txt, post_txt[0]), ("t2i", to_img, post_img[0])):
        ranks = retrieval_ranks(query, gallery)
        out[f"{name}_top1"] = float((ranks < 1).float().mean())
        out[f"{name}_top5"] = float((ranks < 5).float().mean())
    tokens = ids != PAD
    token_err = lambda logits: float((logits.argmax(-1) != ids)[tokens].float().mean())  # noqa: E731
    out["rec_img_mse"] = float(F.mse_loss(model.img_dec(post_img[0]), pixels))
    out["rec_txt_err"] = token_err(model.txt_dec(post_txt[0]))
    out["xrec_img_mse"] = float(F.mse_loss(model.img_dec(to_img), pixels))
    crossed = model.txt_dec(to_txt)
    out["xrec_txt_err"] = token_err(crossed)
    out["xrec_digit_acc"] = float((crossed.argmax(-1) == digit_tokens[test.labels][:, None]).any(1).float().mean())
    return out


@torch.no_grad()
def downstream_metrics(res: Resident, zero_fill: bool) -> dict[str, float]:
    test = res.test
    pred = res.classifier(fill_features(res.model, test, zero_fill)).argmax(-1).numpy()
    labels = test.labels.numpy()
    filled = ~(test.has_img & test.has_txt).numpy()
    f1 = lambda m: float(f1_score(labels[m], pred[m], average="macro", labels=range(10), zero_division=0))  # noqa: E731
    everything = np.ones_like(filled)
    return {"f1": f1(everything), "accuracy": float((pred == labels).mean()), "f1_filled": f1(filled)}


# --- the algorithm ---------------------------------------------------------------------


class FedRecon(FromConfig):
    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.opts: Options = options_of(cfg)
        o = self.opts
        if cfg.rounds <= o.phase_a + o.phase_b:
            raise ScheduleError(
                f"rounds ({cfg.rounds}) must exceed algorithm.options.phase_a + phase_b "
                f"({o.phase_a} + {o.phase_b}) so phase C trains the downstream model; raise rounds or shorten the phases"
            )
        self.kinds = client_kinds(cfg.seed, cfg.clients.total, o.modality_mix)
        self.mapping = o.variant != "no_mapping"
        self.groups = VAE_GROUPS if self.mapping else mvae.IMAGE_MODULES + mvae.TEXT_MODULES

    @cached_property
    def _eval_resident(self) -> Resident:
        return self.build_resident()

    @cached_property
    def digit_tokens(self) -> torch.Tensor:
        return torch.tensor([self.data.tokenizer.vocab[w] for w in DIGIT_WORDS])

    def phase(self, round: int) -> str:
        return phase_of(round, self.opts.phase_a, self.opts.phase_b)

    @property
    def generator_frozen_in_b(self) -> bool:
        return self.opts.variant in ("full", "zero_fill")

    # --- driver side ----------------------------------------------------------------
    def init_server(self) -> Groups:
        res = self._eval_resident
        return {g: module_tensors(res.module(g)) for g in self.groups + (CLASSIFIER,)}

    def broadcast(self, state: Groups, round: int, client_ids: list[int]) -> Broadcast:
        return Broadcast(round=round, tensors=flatten(state), payload={"phase": self.phase(round)})

    def finalize(self, state: Groups, acc: dict[str, agg.WeightedSum]) -> Groups:
        """Modules nobody trained this round keep their value; `state` is not modified."""
        new = dict(state)
        for group, ws in sorted(acc.items()):
            mean = agg.ws_mean(ws)
            if group not in state or state[group].keys() != mean.keys():
                raise ValueError(f"aggregated module {group!r} does not match the server state")
            new[group] = mean
        return new

    def evaluate(self, state: Groups) -> dict[str, float]:
        res = self._eval_resident
        res.load(state)
        return {**downstream_metrics(res, self.opts.variant == "zero_fill"), **generator_metrics(res.model, res.test, self.digit_tokens)}

    @torch.no_grad()
    def translation_per_digit(self, state: Groups) -> list[float]:
        """Per digit: the share of test images whose reconstructed caption names it."""
        res = self._eval_resident
        res.load(state)
        test = res.test
        named = (res.model.fill_text(test.true_pixels) == self.digit_tokens[test.labels][:, None]).any(1)
        return [float(named[test.labels == c].float().mean()) for c in range(mvae.NUM_CLASSES)]

    def pairs_per_digit(self) -> list[int]:
        """Per digit: the training samples holding both modalities, over all clients -- all
        that the cross-modal terms (cross-reconstruction, alignment, T) ever see."""
        counts = torch.zeros(mvae.NUM_CLASSES, dtype=torch.long)
        for cid in range(self.cfg.clients.total):
            b = self.client_data(cid)
            counts += torch.bincount(b.labels[b.has_img & b.has_txt], minlength=mvae.NUM_CLASSES)
        return counts.tolist()

    def state_tensors(self, state: Groups) -> Tensors:
        return flatten(state)

    def load_state_tensors(self, tensors: Tensors) -> Groups:
        return unflatten(tensors)

    # --- worker groups (raysim/run/groups.py): which modalities a client holds
    def client_families(self) -> list[str]:
        return list(KINDS)

    def client_family(self, client_id: int) -> str:
        return self.kinds[client_id]

    # --- worker side ----------------------------------------------------------------
    def build_resident(self) -> Resident:
        o, c = self.opts, self.cfg
        # Every process builds the same initial weights, without touching the global RNG.
        with torch.random.fork_rng():
            torch.manual_seed(c.seed)
            vocab = self.data.tokenizer.vocab_size
            model = mvae.MVAE(o.latent_dim, o.hidden_dim, o.mapping_hidden, vocab, c.model.max_text_len, self.mapping)
            classifier = mvae.Classifier(o.latent_dim, o.classifier_hidden)
        test = self.data.test
        test_batch = masked_batch(test, *test_masks(c.seed, len(test), o.modality_mix, o.missing_rate), keep_truth=True)
        return Resident(model.eval(), classifier.eval(), test_batch)

    def client_data(self, client_id: int, state: dict | None = None) -> Batch:
        """The client's samples with its missing-modality masks: drawn from (seed, client id)
        the first time, then kept in its worker state (`state`, updated in place)."""
        data = self.data.client(client_id)
        kept = (state or {}).get("masks")
        if kept is None:
            kind = self.kinds[client_id]
            has_img, has_txt = client_masks(self.cfg.seed, client_id, kind, len(data), self.opts.missing_rate)
            kept = {"has_img": has_img.to(torch.uint8), "has_txt": has_txt.to(torch.uint8)}
            if state is not None:
                state["masks"] = kept
        return masked_batch(data, kept["has_img"].bool(), kept["has_txt"].bool())

    def trained_groups(self, phase: str, batch: Batch) -> set[str]:
        """The modules a client trains (and uploads) in a phase, given what its samples hold."""
        if phase == "C":
            return {CLASSIFIER}
        pairs = bool((batch.has_img & batch.has_txt).any())
        if phase == "B" and self.generator_frozen_in_b:
            return set(mvae.MAPPING_MODULES) if pairs else set()
        groups = set()
        if batch.has_img.any():
            groups |= set(mvae.IMAGE_MODULES)
        if batch.has_txt.any():
            groups |= set(mvae.TEXT_MODULES)
        if pairs and self.mapping:
            groups |= set(mvae.MAPPING_MODULES)
        return groups

    def needed_groups(self, phase: str, batch: Batch) -> set[str]:
        """What a client must download: what it trains, plus the frozen modules it uses."""
        trained = self.trained_groups(phase, batch)
        if phase == "B" and trained:
            return trained | set(mvae.IMAGE_MODULES + mvae.TEXT_MODULES)
        if phase != "C":
            return trained
        needed = {CLASSIFIER, "img_enc", "txt_enc"}
        if self.opts.variant != "zero_fill":
            if not batch.has_txt.all():  # captions to reconstruct from images
                needed |= {"txt_dec"} | ({"map_i2t"} if self.mapping else set())
            if not batch.has_img.all():
                needed |= {"img_dec"} | ({"map_t2i"} if self.mapping else set())
        return needed

    def bytes_down(self, msg: Broadcast, client_id: int) -> int:
        needed = self.needed_groups(self.phase(msg.round), self.client_data(client_id))
        return grouped.nbytes(msg.tensors, needed)

    def client_step(self, ctx: ClientContext, msg: Broadcast) -> ClientResult:
        res: Resident = ctx.resident
        res.load(unflatten(msg.tensors))
        batch = self.client_data(ctx.client_id, ctx.state)
        phase = self.phase(msg.round)
        groups = self.trained_groups(phase, batch)
        gen = torch.Generator().manual_seed(ctx.seed)
        loss = float("nan")
        if phase == "C":
            loss = train_classifier(res, batch, self.opts, self.cfg, gen)
        elif groups:
            mapping_only = phase == "B" and self.generator_frozen_in_b
            loss = train_vae(res, groups, batch, self.opts, mapping_only, self.cfg, gen)
        res.model.requires_grad_(False), res.classifier.requires_grad_(False)
        upload = {g: module_tensors(res.module(g)) for g in sorted(groups)}
        metrics = {
            "train_loss": loss,
            "n_image": float(batch.has_img.sum()),
            "n_text": float(batch.has_txt.sum()),
            "n_pair": float((batch.has_img & batch.has_txt).sum()),
        }
        return ClientResult(ctx.client_id, len(batch), flatten(upload), metrics)

    def zero(self, msg: Broadcast) -> dict[str, agg.WeightedSum]:
        return {}

    def accumulate(self, acc: dict[str, agg.WeightedSum], result: ClientResult) -> dict[str, agg.WeightedSum]:
        """Each module weighted by the client's samples that hold its modality (the
        classifier by all its samples). Updates `acc` in place, as the fold allows."""
        for group, tensors in sorted(unflatten(result.tensors).items()):
            if group == CLASSIFIER:
                weight = float(result.num_examples)
            elif group in _WEIGHT_KEY:
                weight = float(result.metrics[_WEIGHT_KEY[group]])
            else:
                raise ValueError(f"client {result.client_id} uploaded an unknown module {group!r}")
            if weight <= 0:
                raise ValueError(f"client {result.client_id} uploaded {group!r} without holding its modality")
            agg.ws_add(acc.setdefault(group, agg.ws_zero()), tensors, weight)
        return acc

    def merge(self, a: dict[str, agg.WeightedSum], b: dict[str, agg.WeightedSum]) -> dict[str, agg.WeightedSum]:
        return grouped.merge(a, b)


ALGORITHM = FedRecon
