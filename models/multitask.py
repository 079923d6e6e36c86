"""Encoder-decoder models for multi-task learning on small images (M-Fed).

One image encoder (a small CNN, 3xSxS -> d features) is shared by every task; each
task has its own decoder, loss and test metric:

- ``classify``: MLP head -> 10 logits, cross-entropy; metric accuracy.
- ``regress``: MLP head -> 1 value, the digit's magnitude (standardised), MSE; metric R^2.
- ``denoise``: transposed-conv decoder -> 3xSxS, MSE against the clean image from a
  noisy input; metric PSNR (dB, images in [-1, 1] so the peak-to-peak range is 2).

The encoder may carry LoRA instead of full fine-tuning (``add_encoder_lora``), so the
same training code applies to a large frozen encoder. Plain torch; peft only through
models.lora.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

TASKS = ("classify", "regress", "denoise")
METRIC = {"classify": "accuracy", "regress": "r2", "denoise": "psnr"}
NUM_CLASSES = 10
# Digit magnitude 0..9 is standardised (mean 4.5, std of a uniform 0..9) so the
# regression loss has the same scale as the other tasks' losses at initialisation.
_MAG_MEAN, _MAG_STD = 4.5, math.sqrt((10**2 - 1) / 12)
_PEAK_TO_PEAK = 2.0
ENCODER_ADAPTER = "encoder"


class ImageEncoder(nn.Module):
    """Three stride-2 convolutions (S -> S/8) and a linear projection to `dim` features.
    No batch norm: running statistics would be state outside the averaged tensors."""

    def __init__(self, dim: int, image_size: int = 32, width: int = 16):
        super().__init__()
        if image_size % 8:
            raise ValueError(f"image_size must be a multiple of 8, got {image_size}")
        self.conv1 = nn.Conv2d(3, width, 3, stride=2, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1)
        self.proj = nn.Linear(4 * width * (image_size // 8) ** 2, dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(images))
        x = F.relu(self.conv2(x))
        x = F.relu(self.conv3(x))
        return self.proj(x.flatten(1))


class MLPHead(nn.Module):
    def __init__(self, dim: int, out: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, out)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(z)))


class ConvDecoder(nn.Module):
    """Features -> 3xSxS image in [-1, 1], mirroring the encoder."""

    def __init__(self, dim: int, image_size: int = 32, width: int = 16):
        super().__init__()
        self.side = image_size // 8
        self.width = width
        self.fc = nn.Linear(dim, 4 * width * self.side**2)
        self.up1 = nn.ConvTranspose2d(4 * width, 2 * width, 4, stride=2, padding=1)
        self.up2 = nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1)
        self.up3 = nn.ConvTranspose2d(width, 3, 4, stride=2, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.fc(z)).view(-1, 4 * self.width, self.side, self.side)
        x = F.relu(self.up1(x))
        x = F.relu(self.up2(x))
        return torch.tanh(self.up3(x))


def build_decoder(task: str, dim: int, image_size: int = 32) -> nn.Module:
    if task == "classify":
        return MLPHead(dim, NUM_CLASSES)
    if task == "regress":
        return MLPHead(dim, 1)
    if task == "denoise":
        return ConvDecoder(dim, image_size)
    raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")


# --- task data, losses and metrics -----------------------------------------------------


def task_batch(
    task: str, images: torch.Tensor, labels: torch.Tensor, noise_std: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(encoder input, decoder target) for one batch of one task."""
    if task == "classify":
        return images, labels
    if task == "regress":
        return images, (labels.float() - _MAG_MEAN) / _MAG_STD
    if task == "denoise":
        noise = torch.randn(images.shape, generator=generator) * noise_std
        return images + noise, images
    raise ValueError(f"unknown task {task!r}; known tasks: {', '.join(TASKS)}")


def task_loss(task: str, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    if task == "classify":
        return F.cross_entropy(pred, target)
    return F.mse_loss(pred.reshape(target.shape), target)


def output_distance(pred: torch.Tensor, anchor: torch.Tensor) -> torch.Tensor:
    """Output-space decoder pull: mean squared difference of two decoders' outputs
    (logits for classification), the same form for every task."""
    return F.mse_loss(pred, anchor)


def task_metrics(task: str, pred: torch.Tensor, target: torch.Tensor) -> dict[str, float]:
    if task == "classify":
        return {"accuracy": pred.argmax(1).eq(target).float().mean().item()}
    mse = F.mse_loss(pred.reshape(target.shape).double(), target.double()).item()
    if task == "regress":
        var = target.double().var(unbiased=False).item()
        return {"r2": 1.0 - mse / var, "mse": mse}
    return {"psnr": 10.0 * math.log10(_PEAK_TO_PEAK**2 / mse), "mse": mse}


@torch.no_grad()
def evaluate_task(
    encoder: nn.Module, decoder: nn.Module, task: str, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int
) -> dict[str, float]:
    was_training = encoder.training, decoder.training
    encoder.eval(), decoder.eval()
    preds = [decoder(encoder(inputs[s : s + batch_size])) for s in range(0, len(inputs), batch_size)]
    encoder.train(was_training[0]), decoder.train(was_training[1])
    return task_metrics(task, torch.cat(preds), targets)


# --- moving weights in and out ---------------------------------------------------------
# models.lora is imported inside the LoRA paths only: peft pulls in transformers, which
# takes several seconds to import in every worker process, and full fine-tuning needs neither.


def add_encoder_lora(encoder: nn.Module, r: int, alpha: float, dropout: float, targets: list[str]) -> nn.Module:
    """Freeze `encoder` and wrap it with one LoRA adapter on the named layers; only the
    adapter is then trained and exchanged."""
    names = {n for n, _ in encoder.named_modules()}
    unknown = sorted(set(targets) - names)
    if unknown:
        raise ValueError(f"LoRA targets {unknown} are not encoder layers; the encoder has {sorted(names - {''})}")
    from models.lora import add_lora, lora_config

    for p in encoder.parameters():
        p.requires_grad_(False)
    return add_lora(encoder, {ENCODER_ADAPTER: lora_config(r, alpha, dropout, targets, [])})


def is_lora(encoder: nn.Module) -> bool:
    return hasattr(encoder, "peft_config")


def encoder_tensors(encoder: nn.Module) -> dict[str, torch.Tensor]:
    """What the encoder exchanges: the LoRA adapter if it has one, else every weight."""
    if is_lora(encoder):
        from models.lora import adapter_state

        return adapter_state(encoder, ENCODER_ADAPTER)
    return {k: v.detach().clone() for k, v in encoder.state_dict().items()}


def load_encoder_tensors(encoder: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    if is_lora(encoder):
        from models.lora import load_adapter_state

        load_adapter_state(encoder, ENCODER_ADAPTER, tensors)
    else:
        encoder.load_state_dict(tensors, strict=True)


def encoder_trainable(encoder: nn.Module) -> list[nn.Parameter]:
    return [p for p in encoder.parameters() if p.requires_grad]


def module_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}
