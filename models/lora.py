"""LoRA through peft. The only file that imports peft; adapters are read and written
only through peft's state-dict functions."""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict


@contextmanager
def _no_peft_deprecation_warning():
    # peft reads transformers' deprecated `is_gradient_checkpointing` when it wraps a model:
    # a FutureWarning per model and process (every worker) that the user can do nothing about.
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*is_gradient_checkpointing", category=FutureWarning)
        yield


def lora_config(r: int, alpha: float, dropout: float, target_modules, modules_to_save) -> LoraConfig:
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=list(target_modules),
        modules_to_save=list(modules_to_save) or None,
        bias="none",
    )


def add_lora(model, configs: dict[str, LoraConfig]) -> PeftModel:
    """Wrap `model` with one named adapter per config (e.g. one per LoRA rank in use)."""
    names = sorted(configs)
    with _no_peft_deprecation_warning():
        peft_model = get_peft_model(model, configs[names[0]], adapter_name=names[0])
    for name in names[1:]:
        peft_model.add_adapter(name, configs[name])
    return peft_model


def activate(peft_model: PeftModel, name: str) -> None:
    peft_model.base_model.set_adapter(name)


def adapter_state(peft_model: PeftModel, name: str) -> dict[str, torch.Tensor]:
    sd = get_peft_model_state_dict(peft_model, adapter_name=name)
    return {k: v.detach().to("cpu", copy=True) for k, v in sd.items()}  # results travel from CPU memory


def load_adapter_state(peft_model: PeftModel, name: str, tensors: dict[str, torch.Tensor]) -> None:
    result = set_peft_model_state_dict(peft_model, tensors, adapter_name=name)
    missing = [k for k in getattr(result, "unexpected_keys", []) if "lora_" in k or "modules_to_save" in k]
    if missing:
        raise ValueError(f"adapter tensors not used by the model: {missing[:3]}")


def trainable_parameters(peft_model: PeftModel) -> list[torch.nn.Parameter]:
    return [p for p in peft_model.parameters() if p.requires_grad]


def save_adapter(peft_model: PeftModel, name: str, tensors: dict[str, torch.Tensor], out_dir: Path) -> None:
    """Write `tensors` as adapter `name` so that PeftModel.from_pretrained(base, out_dir) loads it."""
    load_adapter_state(peft_model, name, tensors)
    peft_model.save_pretrained(str(out_dir), selected_adapters=[name], safe_serialization=True)
    # save_pretrained puts non-default adapters in a sub-folder; flatten so from_pretrained finds it.
    sub = Path(out_dir) / name
    if name != "default" and sub.is_dir():
        for f in sub.iterdir():
            f.replace(Path(out_dir) / f.name)
        sub.rmdir()


def load_saved_adapter(base_model, out_dir: Path) -> PeftModel:
    with _no_peft_deprecation_warning():
        return PeftModel.from_pretrained(base_model, str(out_dir))
