"""The loss of one client's batch over world_size ranks (lora.backend.world_size > 1): every
rank draws the same batches, forwards its contiguous share of each (shard_rows) and
computes the whole batch's loss from the gathered embeddings (group_logits), so the group
takes the one-process step."""
from __future__ import annotations

from typing import Optional

import torch


def shard_rows(batch: torch.Tensor, rank: int, world_size: int) -> torch.Tensor:
    """This rank's rows of a batch: contiguous chunks of ceil(n / N) rows, the last
    chunk(s) padded with the batch's last row, so every rank forwards the same number of
    rows (all_gather needs equal sizes) and the gathered rows [:n] are the batch in order.
    The padding rows' embeddings are dropped before the loss: they get no gradient."""
    chunk = -(-len(batch) // world_size)
    padded = torch.cat([batch, batch[-1:].expand(chunk * world_size - len(batch))])
    return padded[rank * chunk:(rank + 1) * chunk]


class _GatherRows(torch.autograd.Function):
    """all_gather along rows with a gradient: every rank computes the same loss from the
    gathered rows, so the gradient of its own rows is the sum over ranks of the gathered
    gradient's slice (an all_reduce; gloo has no reduce_scatter). DeepSpeed then averages
    the parameter gradients over the N ranks: sum over ranks of N x (1/N) x each rank's
    part = the one-process gradient of the whole batch."""

    @staticmethod
    def forward(ctx, x):
        import torch.distributed as dist

        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), len(x)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def group_logits(out, n: int, logit_scale: tuple[torch.Tensor, Optional[torch.Tensor]], check: bool = False):
    """Logits of the whole batch (n rows) from this rank's model output: the gathered,
    normalised image and text embeddings with the model's own formula,
    logits_per_text = text @ image.T * exp(logit_scale) (+ logit_bias: SigLIP). With
    `check`, this rank's block must equal the logits the model computed itself."""
    img = _GatherRows.apply(out.image_embeds.float())
    txt = _GatherRows.apply(out.text_embeds.float())
    scale, bias = logit_scale
    per_text = txt @ img.T * scale.to(txt.device)
    if bias is not None:
        per_text = per_text + bias.to(txt.device)
    if check:
        import torch.distributed as dist

        k = len(out.image_embeds)
        r = dist.get_rank() * k
        own = out.logits_per_image.float()
        if not torch.allclose(per_text.T[r:r + k, r:r + k], own, rtol=1e-4, atol=1e-4 * float(scale.max())):
            raise RuntimeError("lora.backend.world_size > 1 needs a dual encoder whose logits are "
                               "text_embeds @ image_embeds.T * exp(logit_scale) (+ logit_bias); this model's differ")
    return per_text[:n, :n].T


def frozen_logit_scale(model) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """exp(logit_scale) and logit_bias of the base, read before DeepSpeed partitions them
    (ZeRO-3). LoRA leaves them frozen, so they are constants of the run."""
    base = model.get_base_model()
    scale, bias = base.logit_scale, getattr(base, "logit_bias", None)
    for p in (scale, bias):
        if isinstance(p, torch.nn.Parameter) and p.requires_grad:
            raise ValueError("lora.backend.world_size > 1 needs logit_scale/logit_bias frozen")
    return scale.detach().exp().clone(), None if bias is None else bias.detach().clone()
