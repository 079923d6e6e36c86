"""A locked text tower (LiT, Zhai et al. 2022, with the towers' roles swapped): a frozen text
tower without trainable weights runs in inference mode, and its features of a fixed set of
captions can be computed once and fed to the dual encoder's forward (`text_features`) in
place of running the tower. Needs a model whose forward takes them: the MiniLM dual
encoder (models/minilm.py, MeanPoolDualEncoder)."""
from __future__ import annotations

import torch


def _base(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def can_lock_text_tower(model) -> bool:
    """Whether the model's forward takes precomputed text features (`pool_text` makes them)."""
    return hasattr(_base(model), "pool_text")


def mark_locked_text_tower(base) -> None:
    """Lock the text tower unless LoRA (or modules_to_save) put trainable weights in it."""
    base.raysim_locked_text = not any(p.requires_grad for p in base.text_model.parameters())


def locked_text_tower(model) -> torch.nn.Module | None:
    """The text tower when mark_locked_text_tower locked it, else None."""
    base = _base(model)
    return base.text_model if getattr(base, "raysim_locked_text", False) else None


def keep_locked_tower_in_eval(model) -> None:
    """After model.train(): a locked tower stays in inference mode (no dropout)."""
    tower = locked_text_tower(model)
    if tower is not None:
        tower.eval()


@torch.no_grad()
def locked_text_features(model, input_ids: torch.Tensor, attention_mask: torch.Tensor, batch_size: int,
                         device: torch.device) -> torch.Tensor:
    """The locked tower's pooled features of these captions, (N, hidden), on the CPU."""
    base = _base(model)
    out = [base.pool_text(input_ids[i:i + batch_size].to(device), attention_mask[i:i + batch_size].to(device))[1]
           for i in range(0, len(input_ids), batch_size)]
    return torch.cat(out).cpu()
