"""Data quality from the model itself (`lora.quality`): before a client trains, the current
global model, frozen, scores each of its image-caption pairs; low scorers are dropped
(`filter`) or down-weighted (`weight`) in its local loss."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from raysim.config import QualityConfig
from raysim.data import PairData
from raysim.lora.objective import autocast, model_inputs


@torch.no_grad()
def pair_scores(forward, data: PairData, batch_size: int, device: torch.device, precision: str = "fp32",
                text_features: torch.Tensor | None = None) -> torch.Tensor:
    """Each pair's image-caption cosine minus the image's mean cosine to the other local
    captions. The subtraction removes a per-image offset (some images sit closer to all
    text than others), so the score asks "is this caption better than a random one for
    this image?", which is what a shuffled caption fails. `text_features`: a locked text
    tower's features of `data`'s captions (the tower is then not run)."""
    img, txt = [], []
    for s in range(0, len(data), batch_size):
        with autocast(device, precision):
            out = forward(**model_inputs(data, slice(s, s + batch_size), device, text_features))
        img.append(F.normalize(out.image_embeds.float(), dim=-1).cpu())
        txt.append(F.normalize(out.text_embeds.float(), dim=-1).cpu())
    img, txt = torch.cat(img), torch.cat(txt)
    sim = img @ txt.T
    own = sim.diagonal()
    if len(data) < 2:
        return own
    return own - (sim.sum(1) - own) / (len(data) - 1)


def quality_weights(scores: torch.Tensor, q: QualityConfig) -> torch.Tensor:
    """Per-pair weights from quality scores: 0/1 for `filter`, in (0, 1] for `weight`.
    The cut is `filter_threshold` when set -- 0 means "drop a pair whose caption fits its
    image no better than the average other local caption" (pair_scores), a rule that
    drops only what the model calls mismatched and leaves a clean client nearly whole --
    else the client's `filter_fraction` quantile, which drops that share of every client."""
    if q.mode == "none" or len(scores) == 0:
        return torch.ones_like(scores)
    cut = (torch.tensor(q.filter_threshold) if q.filter_threshold is not None
           else torch.quantile(scores, q.filter_fraction))
    if q.mode == "filter":
        keep = scores >= cut
        if keep.sum() < 2:  # a contrastive batch needs two pairs; keep the two best
            keep = torch.zeros_like(keep)
            keep[scores.topk(min(2, len(scores))).indices] = True
        return keep.float()
    return torch.sigmoid((scores - cut) / q.weight_temperature)


def client_weights(state: dict, round: int, trainer, data: PairData, q: QualityConfig, batch_size: int,
                   device: torch.device, precision: str, text_features: torch.Tensor | None) -> torch.Tensor | None:
    """Quality weights of a client's pairs (None: quality off), re-scored by the current
    global model (already loaded in `trainer`) when the client's scores in `state` are
    missing or `q.every` rounds old."""
    if q.mode == "none":
        return None
    kept = state.get("quality")
    if kept is None or (q.every and round - int(kept["round"]) >= q.every):
        trainer.train(False)
        scores = pair_scores(trainer.forward, data, batch_size, device, precision, text_features)
        kept = state["quality"] = {"scores": scores, "round": torch.tensor(round)}
    return quality_weights(kept["scores"], q)
