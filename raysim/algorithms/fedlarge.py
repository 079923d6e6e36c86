"""FedLarge: enterprises jointly fine-tune a large VLM ("Federated Learning in Big Model
Era: Domain-Specific Multimodal Large Models", Li et al. 2023, raysim's reading).

FedAvg on the one LoRA path with the settings the paper asks of a platform for large
models and enterprise clients: the DeepSpeed backend, data quality from the global model,
contribution scores, the MiniLM base with its text tower locked. This file keeps the name
and its `algorithm.options` (configs/fedlarge.yaml) for compatibility: they are mapped onto
the `lora:` settings (and faults.caption_noise), which fedavg and fedprox read directly.
"""
from __future__ import annotations

from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from raysim.algorithms import options_of
from raysim.algorithms.fedavg import FedAvg
from raysim.config import (CaptionNoise, ConfigError, ExperimentConfig, LoraConfig, MiniLMBaseConfig,
                           format_errors)

# The lora: settings fedlarge takes from its options (a run sets them one way, not both).
MAPPED = ("base", "minilm", "loss", "backend", "precision", "gradient_checkpointing", "lock_text_tower", "quality",
          "contribution")


class Options(BaseModel):
    """algorithm.options of fedlarge; each maps onto the lora: setting named in `settings`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base: Literal["config", "minilm"] = "config"  # config: lora.base model
    minilm: MiniLMBaseConfig = MiniLMBaseConfig()
    backend: Literal["torch", "deepspeed"] = "torch"
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload: Literal["none", "optimizer", "optimizer_and_params"] = "none"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    world_size: int = Field(1, ge=1)
    rank_num_cpus: float = Field(1.0, gt=0)
    rank_num_gpus: int = Field(0, ge=0, description="GPUs per rank; > 0: nccl, else gloo on CPU")
    gradient_checkpointing: bool = False
    lock_text_tower: bool = True  # with base minilm
    quality: Literal["none", "filter", "weight"] = "none"
    quality_every: int = Field(0, ge=0)
    filter_fraction: float = Field(0.3, ge=0, lt=1)
    filter_threshold: Optional[float] = None
    weight_temperature: float = Field(0.05, gt=0)
    contribution: Literal["none", "gradient"] = "gradient"
    contribution_sketch_dim: int = Field(65536, ge=16)
    caption_noise: CaptionNoise = CaptionNoise()

    @model_validator(mode="after")
    def _check(self) -> "Options":
        if self.world_size > 1 and self.backend != "deepspeed":
            raise ValueError("world_size > 1 (a client spread over several ranks) needs backend 'deepspeed'")
        return self


def settings(cfg: ExperimentConfig, o: Options) -> ExperimentConfig:
    """`cfg` with fedlarge's options as the lora: settings and faults.caption_noise."""
    lora = {
        "base": "minilm" if o.base == "minilm" else "model",
        **({"minilm": o.minilm.model_dump()} if o.base == "minilm" else {}),
        "loss": "model_logits",  # fedlarge has always trained on the model's own logits
        "backend": {"name": o.backend, "zero_stage": o.zero_stage, "offload": o.offload, "world_size": o.world_size,
                    "rank_num_cpus": o.rank_num_cpus, "rank_num_gpus": o.rank_num_gpus},
        "precision": o.precision,
        "gradient_checkpointing": o.gradient_checkpointing,
        "lock_text_tower": o.lock_text_tower and o.base == "minilm",
        "quality": {"mode": o.quality, "every": o.quality_every, "filter_fraction": o.filter_fraction,
                    "filter_threshold": o.filter_threshold, "weight_temperature": o.weight_temperature},
        "contribution": {"mode": o.contribution, "sketch_dim": o.contribution_sketch_dim},
    }
    d = cfg.to_dict()
    d["lora"].update(lora)
    d["faults"]["caption_noise"] = o.caption_noise.model_dump()
    try:
        return ExperimentConfig.model_validate(d)
    except ValidationError as err:
        text = format_errors(err, "<config>").replace("invalid config <config>:", "invalid config: algorithm.options "
                                                      "of algorithm 'fedlarge', as lora: settings:")
        raise ConfigError(text) from None


class FedLarge(FedAvg):
    KEYS = {"contribution": "algorithm.options.contribution", "base": "algorithm.options.base",
            "lock_text_tower": "algorithm.options.lock_text_tower", "zero_stage": "algorithm.options.zero_stage"}

    def configure(self, cfg: ExperimentConfig) -> ExperimentConfig:
        return settings(cfg, options_of(cfg))

    def config_problems(self) -> list[str]:
        default = LoraConfig()
        both = [f"lora.{k}" for k in MAPPED if getattr(self.source.lora, k) != getattr(default, k)]
        both += ["faults.caption_noise"] if self.source.faults.caption_noise != CaptionNoise() else []
        return [f"{key}: algorithm 'fedlarge' takes this setting from algorithm.options (its compatibility form); "
                "set it there, or run algorithm.name fedavg with the lora: settings" for key in both] + super().config_problems()


ALGORITHM = FedLarge
