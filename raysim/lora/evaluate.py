"""Evaluation of a dual encoder on the test split: zero-shot accuracy against class
prompts, and Recall@1 from images to captions and back."""
from __future__ import annotations

import torch

from models.clip import encode_images, encode_texts
from models.lora import activate, load_adapter_state
from raysim.data import FederatedData


@torch.no_grad()
def evaluate_dual_encoder(model, data: FederatedData, batch_size: int, device=torch.device("cpu")) -> dict[str, float]:
    """Identical captions are indistinguishable, so retrieving any pair whose caption text
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


def evaluate_adapter(model, name: str, adapter, data: FederatedData, batch_size: int, device) -> dict[str, float]:
    """The metrics of `adapter`, loaded as adapter `name` of the resident peft model."""
    activate(model, name)
    load_adapter_state(model, name, adapter)
    return evaluate_dual_encoder(model, data, batch_size, device)
