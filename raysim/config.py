"""Experiment configs: YAML validated into typed models, every problem reported at once."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, NonNegativeFloat, TypeAdapter, ValidationError, field_validator, model_validator


class ConfigError(Exception):
    """A user-facing configuration problem; the CLI prints it and exits with code 2."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


_CLIENT_COUNT = TypeAdapter(Annotated[int, Field(ge=1)])


class ClientsConfig(_Strict):
    # auto: with data.partition by_column, one client per distinct value of data.columns.client
    # (resolved when the data is opened: raysim.data.resolve_clients).
    total: Union[int, Literal["auto"]] = Field(50, description="number of (virtual) clients")
    per_round: int = Field(10, ge=1, description="clients sampled each round")

    @field_validator("total", mode="before")
    @classmethod
    def _count_or_auto(cls, value):
        if value == "auto":
            return value
        try:
            return _CLIENT_COUNT.validate_python(value)
        except ValidationError as err:  # one message, not one per member of the union
            raise ValueError(f"{err.errors()[0]['msg']}, or 'auto'") from None


class ColumnsConfig(_Strict):
    """Which column of a local dataset plays which role; a role set to null is absent."""

    image: str = "image"
    text: Optional[str] = "caption"  # contrastive and captioning objectives
    question: Optional[str] = None  # VQA-style objectives
    answer: Optional[str] = None
    label: Optional[str] = "label"  # Dirichlet skew and zero-shot prompts; integers or strings
    client: Optional[str] = None  # the natural partition (data.partition by_column)


class ShapesConfig(_Strict):
    """The procedurally generated world (raysim/data/shapes.py)."""

    examples_per_client: int = Field(32, ge=1, description="scenes each client holds, whatever clients.total")
    # 0: every client draws the same style; up to 1: a per-client tint, texture, noise and
    # rotation of growing strength (feature skew).
    domain_shift: float = Field(0.0, ge=0, le=1)
    max_objects: int = Field(3, ge=1, le=3)
    test_size: int = Field(500, ge=1, description="scenes of the test split (no client holds them)")
    pretrain_size: int = Field(1000, ge=0, description="scenes of the central pre-training split")


DATASET_KEYS = {  # keys that only some datasets read: setting one for another is an error
    "path": ("local",),
    "test_path": ("local",),
    "columns": ("local",),
    "pretrain_fraction": ("local",),
    "skip_bad_images": ("local",),
    "pretrain_class_share": ("digits",),
    "shapes": ("shapes",),
}


class DataConfig(_Strict):
    # digits: scikit-learn's 8x8 digits with generated captions; shapes: procedurally generated
    # scenes (raysim/data/shapes.py); local: a dataset on local disk read by Hugging Face datasets.
    dataset: Literal["digits", "shapes", "local"] = "digits"
    path: Optional[str] = None  # local: an imagefolder / save_to_disk directory, or a .parquet/.jsonl/.csv file
    test_path: Optional[str] = None  # local: else the 'test' split of path, else test_fraction of path
    columns: ColumnsConfig = ColumnsConfig()
    image_size: int = Field(32, ge=8, le=224)
    partition: Literal["iid", "dirichlet", "by_column", "quantity"] = "dirichlet"
    alpha: float = Field(0.5, gt=0, description="Dirichlet concentration (label skew)")
    # quantity: client sizes are proportional to draws of a Pareto law with this shape (smaller: more skewed).
    quantity_exponent: float = Field(1.5, gt=0)
    test_fraction: float = Field(0.2, gt=0, lt=1)
    # Share of each class's non-test examples held out for central pre-training (clients
    # never see them): skewed towards digits 0-4 so federated training has something to
    # learn, with a few of every class because a base that never saw a class barely learns it.
    pretrain_class_share: list[float] = Field(default_factory=lambda: [0.55] * 5 + [0.05] * 5)
    # local: share of the non-test rows held out for central pre-training (clients never see them).
    pretrain_fraction: float = Field(0.2, ge=0, lt=1)
    # Zero-shot class prompt, "{}" standing for the class name; null: the dataset's own
    # ("a photo of the digit {}", "a large {}" for shapes, "a photo of a {}" for local data).
    prompt_template: Optional[str] = None
    skip_bad_images: bool = False  # local: skip rows whose image cannot be decoded (counted in summary.json)
    shapes: ShapesConfig = ShapesConfig()

    @model_validator(mode="after")
    def _check(self) -> "DataConfig":
        problems = []
        if len(self.pretrain_class_share) != 10 or not all(0 <= s < 1 for s in self.pretrain_class_share):
            problems.append(
                f"data.pretrain_class_share needs 10 shares in [0, 1), one per digit, got {self.pretrain_class_share}"
            )
        for key, datasets in DATASET_KEYS.items():
            # A saved config.yaml lists every key with its default: only a changed value counts.
            default = type(self).model_fields[key].get_default(call_default_factory=True)
            if self.dataset not in datasets and getattr(self, key) != default:
                problems.append(
                    f"data.{key} is read only with data.dataset {' or '.join(datasets)}, not '{self.dataset}'; remove it"
                )
        if self.dataset == "local" and not self.path:
            problems.append("data.dataset 'local' needs data.path (a dataset directory or a .parquet/.jsonl/.csv file)")
        if self.partition == "by_column" and (self.dataset != "local" or not self.columns.client):
            problems.append(
                "data.partition 'by_column' needs data.columns.client, the column whose values are the clients "
                "(data.dataset local)"
                if self.dataset == "local"
                else f"data.partition 'by_column' needs a client column, which data.dataset '{self.dataset}' does not have; "
                "use iid, dirichlet or quantity"
            )
        if self.dataset == "shapes" and self.partition not in ("iid", "dirichlet"):
            problems.append(
                f"data.partition '{self.partition}' does not apply to data.dataset shapes, whose every client holds "
                "data.shapes.examples_per_client scenes; use iid or dirichlet (label skew)"
            )
        if self.dataset == "shapes" and self.image_size < 32:
            problems.append(f"data.image_size {self.image_size}: shapes scenes are at least 32x32; use 32 or more")
        if self.prompt_template is not None and self.prompt_template.count("{}") != 1:
            problems.append(f"data.prompt_template needs exactly one '{{}}' (the class name), got {self.prompt_template!r}")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class ModelConfig(_Strict):
    # tiny_clip: random-init CLIPModel from a CLIPConfig built from the fields below.
    # pretrained: any Hugging Face dual-encoder checkpoint directory (CLIP, VisionTextDualEncoder).
    kind: Literal["tiny_clip", "pretrained"] = "tiny_clip"
    path: Optional[str] = None
    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(128, ge=8)
    projection_dim: int = Field(64, ge=4)
    patch_size: int = Field(8, ge=1)
    max_text_len: int = Field(16, ge=4)

    @model_validator(mode="after")
    def _check(self) -> "ModelConfig":
        if self.kind == "pretrained" and not self.path:
            raise ValueError("model.kind 'pretrained' needs model.path (a checkpoint directory)")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"model.hidden_size ({self.hidden_size}) must be divisible by model.num_heads ({self.num_heads})"
            )
        return self


class PretrainConfig(_Strict):
    enabled: bool = True
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)


class MiniLMBaseConfig(_Strict):
    """The image tower of the MiniLM dual encoder (lora.base: minilm); its text tower is the
    pretrained all-MiniLM-L6-v2."""

    image_tower: Literal["vit", "resnet"] = "vit"
    hidden_size: int = Field(64, ge=8)
    num_layers: int = Field(2, ge=1)
    num_heads: int = Field(4, ge=1)
    intermediate_size: int = Field(128, ge=8)
    patch_size: int = Field(8, ge=1)
    projection_dim: int = Field(64, ge=4)


class LoraBackendConfig(_Strict):
    """Where a client's local training runs: plain torch, or DeepSpeed ZeRO inside the
    client's worker (world_size > 1: in that many Ray actors, one placement group)."""

    name: Literal["torch", "deepspeed"] = "torch"
    zero_stage: Literal[0, 1, 2, 3] = 2
    offload: Literal["none", "optimizer", "optimizer_and_params"] = "none"
    world_size: int = Field(1, ge=1, description="ranks per client")
    rank_num_cpus: float = Field(1.0, gt=0, description="world_size > 1: CPUs of each rank actor")
    rank_num_gpus: int = Field(0, ge=0, description="world_size > 1: GPUs of each rank; > 0: nccl, else gloo")

    @model_validator(mode="after")
    def _check(self) -> "LoraBackendConfig":
        problems = []
        if self.name != "deepspeed" and (self.offload != "none" or self.world_size > 1):
            problems.append("lora.backend.offload and lora.backend.world_size > 1 need lora.backend.name 'deepspeed'")
        if self.offload != "none" and self.zero_stage == 0:
            problems.append("lora.backend.offload needs ZeRO (zero_stage 1-3): stage 0 has no optimizer partition to offload")
        if self.offload == "optimizer_and_params" and self.zero_stage != 3:
            problems.append("lora.backend.offload 'optimizer_and_params' needs zero_stage 3 (only ZeRO-3 partitions weights)")
        if self.world_size == 1 and (self.rank_num_cpus != 1.0 or self.rank_num_gpus != 0):
            problems.append("lora.backend.rank_num_cpus / rank_num_gpus size the rank actors of world_size > 1; "
                            "with world_size 1 the client trains in its worker: drop them or raise world_size")
        if problems:
            raise ValueError("; ".join(problems))
        return self


class QualityConfig(_Strict):
    """Data quality from the model itself: the current global model, frozen, scores each of a
    client's image-caption pairs before it trains; low scorers are dropped (filter) or
    down-weighted (weight). 'none', not 'off': YAML reads a bare off as false."""

    mode: Literal["none", "filter", "weight"] = "none"
    every: int = Field(0, ge=0, description="re-score every K rounds; 0 = only before the first training")
    filter_fraction: float = Field(0.3, ge=0, lt=1, description="the cut: this quantile of a client's scores")
    filter_threshold: Optional[float] = Field(None, description="the cut: this score instead (0: no better than an average other caption)")
    weight_temperature: float = Field(0.05, gt=0, description="weight: sigmoid((score - cut) / T)")


class ContributionConfig(_Strict):
    """Per-client contribution scores, the incentive hook: each round, the cosine of a client's
    update with the round's mean update (gradient similarity, CGSV), in the space the LoRA
    rule averages in."""

    mode: Literal["none", "gradient"] = "none"
    sketch_dim: int = Field(65536, ge=16, description="count-sketch size; exact below it")


class LoraConfig(_Strict):
    """The one LoRA fine-tuning path (raysim/lora/): the adapter, and the independent settings
    of how clients train it. Read by every algorithm on that path (fedavg, fedprox, fedlarge)."""

    r: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"])
    # Trained in full and averaged like any tensor (peft modules_to_save).
    modules_to_save: list[str] = Field(default_factory=lambda: ["visual_projection", "text_projection"])
    # Heterogeneous ranks: client i uses client_ranks[i % len]. Empty = everyone uses r.
    client_ranks: list[int] = Field(default_factory=list)
    # The model family: `model` = the model section (raysim's tiny CLIP, pre-trained and
    # cached, or the dual-encoder checkpoint at model.path); `minilm` = a dual encoder whose
    # text tower is the pretrained all-MiniLM-L6-v2 and whose image tower (lora.minilm) is
    # first aligned to it centrally on the pre-training split, cached too.
    base: Literal["model", "minilm"] = "model"
    minilm: MiniLMBaseConfig = MiniLMBaseConfig()
    # The contrastive loss: `clip` = raysim's CLIP loss on the encoders' features (logit scale
    # clamped at 100, as CLIP trains); `model_logits` = the same InfoNCE on the logits of the
    # checkpoint's own forward (SigLIP's bias included). auto: clip with the torch backend and
    # no locked tower, else model_logits (DeepSpeed and the locked tower run the model's forward).
    loss: Literal["auto", "clip", "model_logits"] = "auto"
    backend: LoraBackendConfig = LoraBackendConfig()
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # autocast dtype of the forward passes
    gradient_checkpointing: bool = False
    # A frozen text tower without trainable weights is locked, as in LiT: inference mode (no
    # dropout), and with the torch backend its features of each client's captions are computed
    # once per worker and reused. Needs a tower that takes precomputed features (the MiniLM dual
    # encoder); LoRA or modules_to_save inside the text tower leave it unlocked.
    lock_text_tower: bool = False
    quality: QualityConfig = QualityConfig()
    contribution: ContributionConfig = ContributionConfig()

    @model_validator(mode="after")
    def _check(self) -> "LoraConfig":
        problems = []
        if any(r < 1 for r in self.client_ranks):
            problems.append(f"lora.client_ranks must all be >= 1, got {self.client_ranks}")
        if not self.target_modules:
            problems.append("lora.target_modules must name at least one module")
        if self.base != "minilm" and self.minilm != MiniLMBaseConfig():
            problems.append("lora.minilm describes the image tower of lora.base 'minilm'; set lora.base: minilm or drop it")
        deepspeed = self.backend.name == "deepspeed"
        if self.loss == "clip" and (deepspeed or self.lock_text_tower):
            problems.append("lora.loss 'clip' calls the encoders directly, which the DeepSpeed backend and a locked "
                            "text tower do not allow (they run the model's forward); use lora.loss 'model_logits' or 'auto'")
        if deepspeed and self.precision == "fp16":
            problems.append("lora.backend 'deepspeed' runs fp32 master weights with autocast; use lora.precision bf16, not fp16")
        if deepspeed and self.client_ranks:
            problems.append("lora.client_ranks with lora.backend 'deepspeed': a DeepSpeed engine owns one adapter's "
                            "parameters (ZeRO-3 hooks the whole model), so one resident model cannot train several "
                            "ranks; use lora.backend.name 'torch' or drop lora.client_ranks")
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def logits(self) -> str:
        """The loss's logits with `auto` resolved: 'clip' or 'model_logits'."""
        if self.loss != "auto":
            return self.loss
        return "clip" if self.backend.name == "torch" and not self.lock_text_tower else "model_logits"


class TrainConfig(_Strict):
    local_epochs: int = Field(2, ge=1)
    batch_size: int = Field(16, ge=1)
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    # Keep each client's AdamW moments on its worker between rounds.
    keep_optimizer_state: bool = True


class AlgorithmConfig(_Strict):
    # A name under raysim/algorithms/ (fedavg, fedprox) or a dotted path "pkg.module:Class".
    name: str = "fedavg"
    mu: float = Field(0.01, ge=0, description="FedProx proximal weight")
    # How LoRA factors are combined: 'factors' averages A and B separately (FedAvg as
    # Flower/FATE do it), 'product' averages B@A and re-factors by SVD, 'hetlora'
    # zero-pads ranks. With client_ranks set, 'factors' is rejected.
    lora_aggregation: Literal["factors", "product", "hetlora"] = "factors"
    # Algorithm-specific settings, validated by the algorithm module's `Options` model.
    options: dict[str, Any] = Field(default_factory=dict)


class WorkerGroup(_Strict):
    """A set of ClientWorker actors with their own resources, serving the clients of the
    listed families (the algorithm's `client_families()`, e.g. CreamFL's image, text and
    image_text clients). The runtime keys num_workers / num_cpus_per_worker /
    num_gpus_per_worker / resources_per_worker form the group "default", which serves every
    family no group lists (it is not started when every family has a group)."""

    # A DNS label: it names the Kubernetes worker group as well.
    name: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]{0,30}[a-z0-9])?$")
    families: list[str] = Field(min_length=1, description="client families this group serves")
    num_workers: int = Field(1, ge=1, description="pooled placement: actors in this group")
    num_cpus: float = Field(1.0, ge=0)
    num_gpus: float = Field(0.0, ge=0, description="per actor; fractions share a GPU")
    resources: dict[str, NonNegativeFloat] = Field(default_factory=dict, description="custom Ray resources per actor")


class RuntimeConfig(_Strict):
    num_workers: int = Field(2, ge=0, description="0 = local mode: one process, no Ray")
    placement: Literal["pooled", "dedicated"] = "pooled"
    # pooled only. sticky: client c always runs on worker c % num_workers; balanced: each
    # round's clients are spread over workers by data size (state moves through disk).
    assignment: Literal["sticky", "balanced"] = "sticky"
    # Client states a worker keeps in memory; beyond this they spill to disk (run_dir/client_state).
    state_memory_mb: Optional[float] = Field(None, gt=0)
    max_worker_restarts: int = Field(-1, ge=-1, description="-1: restart dead workers without limit")
    # Stragglers: sample ceil(per_round * (1 + over_select)) clients, keep the first
    # per_round results; after round_deadline_s stop waiting once min_results are in.
    over_select: float = Field(0.0, ge=0, le=1)
    round_deadline_s: Optional[float] = Field(None, gt=0)
    min_results: Optional[int] = Field(None, ge=1)
    num_cpus_per_worker: float = Field(1.0, ge=0)
    num_gpus_per_worker: float = Field(0.0, ge=0)
    # Custom Ray resources each worker needs (e.g. {"a100": 1} to land on a labelled node group).
    resources_per_worker: dict[str, NonNegativeFloat] = Field(default_factory=dict)
    # dedicated: the client actors' bundles go in one placement group with this strategy.
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # Worker groups per client family (model family); a client only ever runs on a worker of
    # its family's group. Local mode (num_workers 0) runs every family in its one process.
    worker_groups: list[WorkerGroup] = Field(default_factory=list)
    torch_threads: int = Field(1, ge=1, description="torch threads inside each worker")
    ray_address: Optional[str] = None  # None: start an embedded local Ray
    # process: the round loop runs in the process that started Ray (the `raysim run`
    # process or the Ray job's entrypoint); actor: in a Driver actor (num_cpus=0), which
    # costs one more process importing torch at start-up.
    driver: Literal["process", "actor"] = "process"
    # pooled placement: the driver serves clients itself until the first worker is ready
    # (workers take seconds to import torch and build their models), then hands over.
    # None (auto): only when the driver has cores the workers do not take (a Ray cluster,
    # or more local CPUs than the workers reserve). On a machine the workers fill, the
    # driver's rounds and the workers' start-up share the cores and both slow down
    # (measured on 2 cores: docs/benchmarks.md, "Warm start").
    warm_start: Optional[bool] = None
    # pooled, without warm start: how long the first round waits for every worker before it
    # starts with those that are ready (an autoscaler may take minutes to add their nodes).
    start_wait_s: float = Field(60.0, ge=0)
    device: Literal["cpu", "cuda", "auto"] = "cpu"

    @model_validator(mode="after")
    def _check_groups(self) -> "RuntimeConfig":
        problems, owner = [], {}
        names = [g.name for g in self.worker_groups]
        for i, g in enumerate(self.worker_groups):
            if g.name == DEFAULT_GROUP:
                problems.append(
                    f"runtime.worker_groups[{i}].name: '{DEFAULT_GROUP}' is the group of runtime.num_workers and "
                    "*_per_worker; choose another name"
                )
            elif names.count(g.name) > 1 and names.index(g.name) == i:
                problems.append(f"runtime.worker_groups: the name '{g.name}' is used by {names.count(g.name)} groups")
            for f in g.families:
                if f in owner:
                    problems.append(
                        f"runtime.worker_groups[{i}].families: family '{f}' is already served by group '{owner[f]}'; "
                        "a family belongs to one group"
                    )
                owner.setdefault(f, g.name)
        if problems:
            raise ValueError("; ".join(problems))
        return self


DEFAULT_GROUP = "default"  # the group of runtime.num_workers, and the family of every client by default


class RobustConfig(_Strict):
    """Screening of client updates and the aggregation rule (see raysim/guard.py)."""

    rule: Literal[
        "mean", "median", "trimmed_mean", "norm_clip", "multi_krum", "geometric_median", "cosine_filter_clip"
    ] = "mean"
    trim_fraction: float = Field(0.2, ge=0, lt=0.5)
    byzantine_fraction: float = Field(
        0.2, ge=0, lt=0.5, description="multi_krum: expected share of Byzantine clients; sets f unless num_byzantine"
    )
    num_byzantine: Optional[int] = Field(None, ge=0, description="multi_krum: assumed Byzantine updates per round (f)")
    clip_norm: float = Field(1.0, gt=0, description="norm_clip: each update is scaled to at most this norm")
    cosine_threshold: float = Field(
        0.0, ge=-1, lt=1, description="cosine_filter_clip: keep updates whose cosine similarity to the median of the others is above this"
    )
    max_update_norm: Optional[float] = Field(None, gt=0, description="reject updates with a larger L2 norm")
    max_norm_ratio: Optional[float] = Field(
        None,
        ge=1,
        description="before any rule (mean included): drop updates whose L2 norm exceeds this x the median norm of the"
        " round's updates; counted as rejected ('norm_ratio'); off when unset",
    )
    quarantine_strikes: int = Field(3, ge=1, description="rejections in a row before a client is quarantined")
    quarantine_rounds: int = Field(5, ge=0)


class PrivacyConfig(_Strict):
    # Client-level DP (DP-FedAvg): clients clip their update, the driver adds Gaussian noise
    # to the sum; epsilon per round from dp-accounting's RDP accountant.
    dp: bool = False
    clip_norm: float = Field(1.0, gt=0)
    # 0: clipping without noise (a reference for experiments); no privacy, and the CLI says so
    noise_multiplier: Optional[float] = Field(None, ge=0)
    target_epsilon: Optional[float] = Field(None, gt=0, description="calibrate the noise to reach this after all rounds")
    delta: float = Field(1e-5, gt=0, lt=1)
    # SecAgg-style pairwise masking: the driver only sees masked updates and their exact sum.
    secure_aggregation: bool = False
    scale_bits: int = Field(24, ge=8, le=40)

    @model_validator(mode="after")
    def _check(self) -> "PrivacyConfig":
        if self.dp and (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ValueError("privacy.dp needs exactly one of privacy.noise_multiplier or privacy.target_epsilon")
        if self.dp and self.secure_aggregation:
            raise ValueError("privacy.dp with privacy.secure_aggregation is not supported yet; choose one")
        return self


class CaptionNoise(_Strict):
    """Simulated low-quality data: `fraction` of the listed clients' pairs get another pair's
    caption (a cyclic shift among those pairs). Applied by the LoRA path's data (raysim/lora/data.py)."""

    clients: list[int] = Field(default_factory=list)
    fraction: float = Field(0.3, ge=0, le=1)


class FaultsConfig(_Strict):
    """Simulated misbehaviour, for robustness experiments and tests."""

    byzantine_fraction: float = Field(0.0, ge=0, lt=1, description="share of clients that attack")
    attack: Literal["sign_flip", "scale"] = "sign_flip"
    attack_scale: float = Field(10.0, gt=0)
    nan_clients: list[int] = Field(default_factory=list, description="clients whose updates contain NaN")
    slow_clients: dict[int, float] = Field(default_factory=dict, description="client id -> extra seconds")
    caption_noise: CaptionNoise = CaptionNoise()


class EvalConfig(_Strict):
    every: int = Field(1, ge=1)
    batch_size: int = Field(256, ge=1)


class CheckpointConfig(_Strict):
    every: int = Field(1, ge=1)
    keep_last: int = Field(3, ge=1)


class ExperimentConfig(_Strict):
    # the default run directory is runs/<name>: one path component, no "..", no "/"
    name: str = Field("experiment", pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,99}$")
    seed: int = Field(0, ge=0)  # numpy generators take no negative seed
    rounds: int = Field(20, ge=1)
    clients: ClientsConfig = ClientsConfig()
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    pretrain: PretrainConfig = PretrainConfig()
    lora: LoraConfig = LoraConfig()
    train: TrainConfig = TrainConfig()
    algorithm: AlgorithmConfig = AlgorithmConfig()
    runtime: RuntimeConfig = RuntimeConfig()
    eval: EvalConfig = EvalConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    robust: RobustConfig = RobustConfig()
    privacy: PrivacyConfig = PrivacyConfig()
    faults: FaultsConfig = FaultsConfig()

    @model_validator(mode="after")
    def _cross_checks(self) -> "ExperimentConfig":
        problems = []
        if self.clients.total == "auto" and self.data.partition != "by_column":
            problems.append(
                "clients.total 'auto' counts the distinct values of data.columns.client, so it needs "
                f"data.partition by_column (got '{self.data.partition}'); give clients.total a number"
            )
        elif self.clients.total != "auto" and self.clients.per_round > self.clients.total:
            problems.append(
                f"clients.per_round ({self.clients.per_round}) exceeds clients.total "
                f"({self.clients.total}); sample at most as many clients as exist"
            )
        if self.lora.client_ranks and self.algorithm.lora_aggregation == "factors":
            problems.append(
                "lora.client_ranks gives clients different ranks, which "
                "algorithm.lora_aggregation 'factors' cannot average; use 'product' or 'hetlora'"
            )
        if self.robust.max_norm_ratio is not None and (self.privacy.dp or self.privacy.secure_aggregation):
            problems.append(
                "robust.max_norm_ratio compares each update with the round's median norm, which the driver cannot see"
                " under privacy.dp or privacy.secure_aggregation; choose one"
            )
        if (self.privacy.dp or self.privacy.secure_aggregation) and self.robust.rule not in ("mean", "norm_clip"):
            mode = "privacy.secure_aggregation" if self.privacy.secure_aggregation else "privacy.dp"
            problems.append(
                f"robust.rule '{self.robust.rule}' needs every client's update, which the driver does not see under {mode}"
                " (it sees only a masked or noised sum); use robust.rule 'norm_clip' (each client clips its update to"
                " robust.clip_norm before it is masked or noised) or 'mean', or turn the privacy option off"
            )
        special = (
            self.robust.rule != "mean" or self.robust.max_norm_ratio is not None or self.privacy.dp or self.privacy.secure_aggregation
        )
        if special and self.lora.client_ranks:
            problems.append(
                "robust rules, DP and secure aggregation work on same-shape updates; drop lora.client_ranks"
            )
        nb = self.robust.num_byzantine
        if self.robust.rule == "multi_krum" and nb is not None and nb > self.clients.per_round - 3:
            problems.append(
                f"robust.num_byzantine ({nb}): Krum keeps n - f - 2 >= 1 neighbours, so with clients.per_round"
                f" {self.clients.per_round} it can assume at most {max(0, self.clients.per_round - 3)} Byzantine updates"
                " per round; lower it or sample more clients"
            )
        if self.privacy.secure_aggregation and self.runtime.warm_start:
            problems.append(
                "runtime.warm_start trains clients in the driver's process, which would then see their plain"
                " updates under privacy.secure_aggregation; set runtime.warm_start false, or leave it unset"
                " (it is off under secure aggregation)"
            )
        outside = [c for c in self.faults.caption_noise.clients if not 0 <= c < self.clients.total]
        if outside:
            problems.append(f"faults.caption_noise.clients {outside} are not client ids (0 to clients.total - 1)")
        if self.runtime.min_results and self.runtime.min_results > self.clients.per_round:
            problems.append(
                f"runtime.min_results ({self.runtime.min_results}) exceeds clients.per_round ({self.clients.per_round})"
            )
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")

    def fingerprint(self, *sections: str) -> str:
        """Stable hash of the named sections (all if none), e.g. for cache keys."""
        d = self.to_dict()
        if sections:
            d = {k: d[k] for k in sections}
        blob = json.dumps(d, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def _parse_override(item: str) -> tuple[list[str], Any]:
    if "=" not in item:
        raise ConfigError(f"override '{item}' is not of the form key.sub=value")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}' has an empty key; write key.sub=value")
    try:
        value = yaml.safe_load(raw) if raw != "" else ""
    except yaml.YAMLError:
        value = raw
    return key.split("."), value


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    data = json.loads(json.dumps(data))  # deep copy, plain types
    for item in overrides:
        path, value = _parse_override(item)
        node = data
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override '{item}': '{part}' is a value, not a section")
            node = child
        node[path[-1]] = value
    return data


def format_errors(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key; check its spelling against configs/quickstart.yaml"
        got = e.get("input")
        shown = "" if e["type"] in ("extra_forbidden", "missing") or isinstance(got, dict) else f" (got {got!r})"
        lines.append(f"  - {loc}: {msg}{shown}")
    return f"invalid config {source}:\n" + "\n".join(lines)


def config_from_dict(data: Any, source: str = "<dict>") -> ExperimentConfig:
    """The typed config. `algorithm.options` belongs to the algorithm (importing it imports
    torch): raysim.algorithms.options_of checks it."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {source}: the top level must be a mapping of keys, got {type(data).__name__}")
    try:
        cfg = ExperimentConfig.model_validate(data)
    except ValidationError as err:
        raise ConfigError(format_errors(err, source)) from None
    return cfg


def load_config(path: str | Path, overrides: list[str] | None = None) -> ExperimentConfig:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"config file {path} is a directory; pass a YAML file such as configs/quickstart.yaml")
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist; pass a YAML file such as configs/quickstart.yaml")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise ConfigError(
            f"config file {path} is not UTF-8 text (byte {err.start}: {err.object[err.start:err.start + 1]!r}); "
            "save it as UTF-8"
        ) from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise ConfigError(f"config file {path} is not valid YAML{where}: {problem}") from None
    if data is None:  # an empty file would silently run every built-in default
        raise ConfigError(f"config file {path} is empty; start from a config such as configs/quickstart.yaml")
    if not isinstance(data, dict):
        raise ConfigError(f"invalid config {path}: the top level must be a mapping of keys")
    data = apply_overrides(data or {}, overrides or [])
    return config_from_dict(data, str(path))


def save_config(cfg: ExperimentConfig, path: Path) -> None:
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
