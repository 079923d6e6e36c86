"""A lightweight multimodal VAE (image + caption) with mapping networks, for FedRecon.

Modalities and their likelihoods:

- **image**: the digits are 8x8 originals upscaled to SxS RGB with identical
  channels, so the VAE works on the 8x8 grey grid (``image_pixels``: channel mean,
  adaptive average pooling) -- 64 values in [-1, 1] instead of 3072, which keeps a
  client step in milliseconds on CPU. Gaussian likelihood with fixed variance 1/2:
  the reconstruction term is the per-sample sum of squared errors.
- **text**: the caption's token ids (``raysim.data.WordTokenizer``), not a frozen
  text embedding. The encoder averages learned token embeddings (bag of words) and
  reads them with an MLP; the decoder is an MLP that outputs token
  logits for every position. Categorical likelihood: the per-sample sum of
  cross-entropies over all positions (padding included: the length is part of the
  caption). The encoder is a bag of words (see TextEncoder for why).

Latents: each modality has its own Gaussian posterior q(z_m | x_m) in a latent space
of the same dimension, with a standard-normal prior. The mapping networks
T_{img->txt} and T_{txt->img} re-encode a sample of one modality's latent into a
Gaussian over the other's (distribution re-encoding): cross-reconstruction decodes a
sample of it with the other modality's decoder, and a sample-level alignment term
KL(T(z_m) || q(z_n | x_n)) pulls it onto the *same sample's* posterior, not only onto
its class. With ``mapping=None`` (ablation) the re-encoding is the identity:
q(z_m | x_m) itself stands in for q(z_n | x_n).

Plain torch: no Ray, no raysim.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IMAGE_GRID = 8  # the VAE's image resolution (see module docstring)
PAD = 0  # raysim.data's padding id (models/ does not import raysim)
NUM_CLASSES = 10
_LOGVAR_RANGE = (-8.0, 6.0)  # keeps exp(logvar) finite early in training
# Posteriors start narrow (std ~0.14, not 1): at unit variance the sampling noise drowns
# the small initial means, and the decoders learn to ignore z for hundreds of steps --
# longer than a federated phase A (measured: the digit word was not learned in 12 rounds).
_LOGVAR_START = -4.0
Gaussian = tuple[torch.Tensor, torch.Tensor]  # (mu, logvar)

# Module names double as the federated groups (one weighted mean per group).
IMAGE_MODULES = ("img_enc", "img_dec")
TEXT_MODULES = ("txt_enc", "txt_dec")
MAPPING_MODULES = ("map_i2t", "map_t2i")


def image_pixels(images: torch.Tensor) -> torch.Tensor:
    """(N, 3, S, S) in [-1, 1] -> (N, 64) grey 8x8 grid."""
    grey = images.mean(dim=1, keepdim=True)
    return F.adaptive_avg_pool2d(grey, IMAGE_GRID).flatten(1)


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.GELU())
    return nn.Sequential(*layers)


def _split_gaussian(out: torch.Tensor) -> Gaussian:
    mu, logvar = out.chunk(2, dim=-1)
    return mu, (logvar + _LOGVAR_START).clamp(*_LOGVAR_RANGE)


class ImageEncoder(nn.Module):
    def __init__(self, latent: int, hidden: int):
        super().__init__()
        self.net = _mlp([IMAGE_GRID**2, hidden, hidden, 2 * latent])

    def forward(self, pixels: torch.Tensor) -> Gaussian:
        return _split_gaussian(self.net(pixels))


class ImageDecoder(nn.Module):
    """Pixel means in [-1, 1] (tanh matches the data range)."""

    def __init__(self, latent: int, hidden: int):
        super().__init__()
        self.net = _mlp([latent, hidden, hidden, IMAGE_GRID**2])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.net(z))


class TextEncoder(nn.Module):
    """Bag of words: the mean embedding of the caption's tokens, then an MLP. The word
    set determines a caption here (templates differ in their words), and pooling makes
    the digit word count the same wherever the template puts it -- a per-position
    encoder (flattened embeddings) had not learned the digit word after 12 federated
    rounds, even under IID data."""

    def __init__(self, latent: int, hidden: int, vocab: int, embed: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, embed, padding_idx=PAD)
        self.net = _mlp([embed, hidden, 2 * latent])

    def forward(self, ids: torch.Tensor) -> Gaussian:
        tokens = (ids != PAD).float()
        pooled = (self.embed(ids) * tokens[..., None]).sum(1) / tokens.sum(1, keepdim=True).clamp(min=1)
        return _split_gaussian(self.net(pooled))


class TextDecoder(nn.Module):
    """Token logits (N, length, vocab): per-position logits plus one content vector shared
    by every position. The content head says *which* words the caption holds wherever
    they go (the digit word moves with the template), the positional head where they go;
    a purely positional decoder must learn every (template, digit) pair and had not
    learned the digit word after 12 federated rounds."""

    def __init__(self, latent: int, hidden: int, vocab: int, length: int):
        super().__init__()
        self.vocab, self.length = vocab, length
        self.net = _mlp([latent, hidden, length * vocab])
        self.content = _mlp([latent, hidden, vocab])

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z).view(-1, self.length, self.vocab) + self.content(z)[:, None, :]


class Mapping(nn.Module):
    """T_{m->n}: a latent sample of modality m -> a Gaussian over modality n's latent.
    LayerNorm + GELU as in the paper, at a fraction of its 64->512x3->64 width.

    Residual: the mean is z + f(z), with f's last layer zero at the start, so T starts as
    the identity (what `no_mapping` uses throughout) and learns the sample-level correction.
    Started at random instead, T fed the text decoder noise for the first rounds of phase A
    and the image and text latents never came to share a layout: image->caption retrieval
    through T stayed at chance (measured, Dirichlet 0.1: i2t top-1 0.04-0.07 vs 0.11 residual)."""

    def __init__(self, latent: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(latent, hidden),
            nn.LayerNorm(hidden),
            nn.GELU(),
            nn.Linear(hidden, hidden),
            nn.LayerNorm(hidden),
            nn.GELU(),
            nn.Linear(hidden, 2 * latent),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, z: torch.Tensor) -> Gaussian:
        shift, logvar = _split_gaussian(self.net(z))
        return z + shift, logvar


class MVAE(nn.Module):
    """Encoders, decoders and (optionally) mapping networks, named as the federated groups."""

    def __init__(self, latent: int, hidden: int, map_hidden: int, vocab: int, length: int, mapping: bool = True):
        super().__init__()
        self.img_enc = ImageEncoder(latent, hidden)
        self.img_dec = ImageDecoder(latent, hidden)
        self.txt_enc = TextEncoder(latent, hidden, vocab)
        self.txt_dec = TextDecoder(latent, hidden, vocab, length)
        self.map_i2t = Mapping(latent, map_hidden) if mapping else None
        self.map_t2i = Mapping(latent, map_hidden) if mapping else None

    @property
    def has_mapping(self) -> bool:
        return self.map_i2t is not None

    def group_names(self) -> tuple[str, ...]:
        return IMAGE_MODULES + TEXT_MODULES + (MAPPING_MODULES if self.has_mapping else ())

    def reencode(self, z: torch.Tensor, source: Gaussian, to_text: bool) -> Gaussian:
        """The re-encoded distribution over the other modality's latent; the identity
        (the source posterior itself) without mapping networks."""
        if not self.has_mapping:
            return source
        return (self.map_i2t if to_text else self.map_t2i)(z)

    @torch.no_grad()
    def fill_text(self, pixels: torch.Tensor) -> torch.Tensor:
        """Caption token ids reconstructed from an image: txt_dec(T_{img->txt}(img_enc(x))),
        at the posterior means (deterministic)."""
        mu, logvar = self.img_enc(pixels)
        return self.txt_dec(self.reencode(mu, (mu, logvar), to_text=True)[0]).argmax(-1)

    @torch.no_grad()
    def fill_image(self, ids: torch.Tensor) -> torch.Tensor:
        """8x8 pixels reconstructed from a caption: img_dec(T_{txt->img}(txt_enc(x)))."""
        mu, logvar = self.txt_enc(ids)
        return self.img_dec(self.reencode(mu, (mu, logvar), to_text=False)[0])


class Classifier(nn.Module):
    """The downstream multimodal model: an MLP on the concatenated image and text
    posterior means plus two flags saying which modality was observed (2 x latent + 2
    features). Without the flags a reconstructed caption looks exactly like a real one,
    and the model learns from the (mostly real) captions to trust the text half fully."""

    def __init__(self, latent: int, hidden: int):
        super().__init__()
        width = 2 * latent + 2
        self.net = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, hidden), nn.GELU(), nn.Linear(hidden, NUM_CLASSES))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features)


# --- ELBO terms ------------------------------------------------------------------------


def sample(g: Gaussian, gen: torch.Generator | None) -> torch.Tensor:
    mu, logvar = g
    return mu + torch.randn(mu.shape, generator=gen) * (0.5 * logvar).exp()


def kl_standard(g: Gaussian) -> torch.Tensor:
    """KL(N(mu, var) || N(0, I)) per sample."""
    mu, logvar = g
    return 0.5 * (mu.pow(2) + logvar.exp() - 1 - logvar).sum(-1)


def kl_gaussians(p: Gaussian, q: Gaussian) -> torch.Tensor:
    """KL(p || q) per sample for diagonal Gaussians."""
    (mp, lp), (mq, lq) = p, q
    return 0.5 * (lq - lp + (lp.exp() + (mp - mq).pow(2)) / lq.exp() - 1).sum(-1)


def image_nll(mean: torch.Tensor, pixels: torch.Tensor) -> torch.Tensor:
    """-log p(x | z) up to a constant, per sample (variance 1/2)."""
    return (mean - pixels).pow(2).sum(-1)


def text_nll(logits: torch.Tensor, ids: torch.Tensor, log_prior: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample sum of token cross-entropies. `log_prior` (L, V), added to the logits,
    restricts the softmax during local training (see `restricted_log_prior`)."""
    if log_prior is not None:
        logits = logits + log_prior
    return F.cross_entropy(logits.transpose(1, 2), ids, reduction="none").sum(-1)


def restricted_log_prior(counts: torch.Tensor, penalty: float) -> torch.Tensor:
    """Restricted softmax (FedRS, Li & Zhan, KDD 2021) as an additive logit term: 0 for the
    outputs a client holds examples of (`counts` > 0), -penalty for the others. Under strong
    label skew a client's softmax otherwise spends every local step pushing down the classes
    (digit words) it never sees; fresh-Adam steps do that at full size whatever the gradient
    magnitude, and the averaged decoder forgets every digit it is not currently shown.
    Training-time only: decoding and evaluation use the plain logits."""
    return torch.where(counts > 0, 0.0, -penalty)


def _mean(per_sample: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the masked samples; 0 (still a graph-free tensor) if none is."""
    return per_sample[mask].mean() if bool(mask.any()) else per_sample.new_zeros(())


TERMS = ("rec_img", "rec_txt", "kl_img", "kl_txt", "xrec_i2t", "xrec_t2i", "align_i2t", "align_t2i")


def elbo_terms(
    model: MVAE, pixels: torch.Tensor, ids: torch.Tensor, has_img: torch.Tensor, has_txt: torch.Tensor,
    gen: torch.Generator | None = None, txt_log_prior: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """Every term of the negative ELBO, each a batch mean over the samples it applies to:
    own-modality terms over samples holding that modality, cross terms over samples
    holding both. Missing inputs may hold anything: they are never read into a loss.
    `txt_log_prior`: see `text_nll` (the client's restricted softmax over tokens)."""
    post_img, post_txt = model.img_enc(pixels), model.txt_enc(ids)
    z_img, z_txt = sample(post_img, gen), sample(post_txt, gen)
    both = has_img & has_txt
    to_txt = model.reencode(z_img, post_img, to_text=True)
    to_img = model.reencode(z_txt, post_txt, to_text=False)
    # The target posterior is detached: re-encoding moves onto it, it does not move towards T.
    target_txt = tuple(t.detach() for t in post_txt)
    target_img = tuple(t.detach() for t in post_img)
    return {
        "rec_img": _mean(image_nll(model.img_dec(z_img), pixels), has_img),
        "rec_txt": _mean(text_nll(model.txt_dec(z_txt), ids, txt_log_prior), has_txt),
        "kl_img": _mean(kl_standard(post_img), has_img),
        "kl_txt": _mean(kl_standard(post_txt), has_txt),
        "xrec_i2t": _mean(text_nll(model.txt_dec(sample(to_txt, gen)), ids, txt_log_prior), both),
        "xrec_t2i": _mean(image_nll(model.img_dec(sample(to_img, gen)), pixels), both),
        "align_i2t": _mean(kl_gaussians(to_txt, target_txt), both),
        "align_t2i": _mean(kl_gaussians(to_img, target_img), both),
    }


def negative_elbo(terms: dict[str, torch.Tensor], beta: float) -> torch.Tensor:
    """The objective averaged over the two modalities: each modality's ELBO (its
    reconstruction, beta * KL) plus its cross-reconstruction and alignment through T."""
    per_modality = [
        terms["rec_img"] + beta * terms["kl_img"] + terms["xrec_i2t"] + beta * terms["align_i2t"],
        terms["rec_txt"] + beta * terms["kl_txt"] + terms["xrec_t2i"] + beta * terms["align_t2i"],
    ]
    return sum(per_modality) / 2


def mapping_loss(terms: dict[str, torch.Tensor], beta: float) -> torch.Tensor:
    """What the mapping networks alone minimise against a frozen generator."""
    return (terms["xrec_i2t"] + terms["xrec_t2i"] + beta * (terms["align_i2t"] + terms["align_t2i"])) / 2


# --- features for the downstream model -------------------------------------------------


@torch.no_grad()
def features(model: MVAE, pixels: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Concatenated posterior means [mu_img, mu_txt] (N, 2 x latent)."""
    return torch.cat([model.img_enc(pixels)[0], model.txt_enc(ids)[0]], dim=-1)
