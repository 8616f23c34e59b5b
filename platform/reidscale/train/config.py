"""The training job's config: one dataclass with a section per concern."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from reidscale.config import ConfigError
from reidscale.data.transforms import TransformConfig
from reidscale.models.backbone import ModelConfig
from reidscale.tracking import TrackingConfig


@dataclass
class LossConfig:
    """Weights (λ) and settings of the loss terms; a weight of 0 turns a term off."""

    id_weight: float = 1.0
    label_smoothing: float = 0.1
    triplet_weight: float = 1.0
    triplet_margin: float = 0.3
    triplet_soft_margin: bool = False

    def validate(self) -> None:
        if self.id_weight < 0 or self.triplet_weight < 0:
            raise ConfigError("weights must be >= 0")
        if self.id_weight == 0 and self.triplet_weight == 0:
            raise ConfigError("id_weight/triplet_weight: at least one loss term must be on")
        if not 0.0 <= self.label_smoothing < 1.0:
            raise ConfigError("label_smoothing: must be in [0, 1)")


@dataclass
class OptimConfig:
    # adam: L2 weight decay as in the CLIP-ReID/BoT recipes; adamw: decoupled decay
    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 3.5e-4
    weight_decay: float = 5e-4
    momentum: float = 0.9
    schedule: Literal["cosine", "multistep", "constant"] = "cosine"
    warmup_epochs: float = 1.0
    # multistep: epochs at which lr is multiplied by gamma
    milestones: list[int] = field(default_factory=lambda: [40, 70])
    gamma: float = 0.1
    grad_clip: float = 0.0

    def validate(self) -> None:
        if self.lr <= 0:
            raise ConfigError("lr: must be > 0")
        if self.weight_decay < 0 or self.warmup_epochs < 0 or self.grad_clip < 0:
            raise ConfigError("weight_decay/warmup_epochs/grad_clip: must be >= 0")


@dataclass
class TrainConfig:
    epochs: int = 20
    # P identities × K images per worker batch; global batch = num_workers × P × K
    p: int = 16
    k: int = 4
    num_workers: int = 2
    # "auto": GPUs when the cluster has them
    use_gpu: Literal["auto", "true", "false"] = "auto"
    cpus_per_worker: float = 1.0
    # DeepSpeed
    zero_stage: int = 0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    gradient_accumulation_steps: int = 1
    seed: int = 0
    log_every: int = 10
    # 0: checkpoint at the end of every epoch only
    checkpoint_every_steps: int = 0
    # Rank-1/mAP on the query/gallery split every N epochs (0: off); the best model is exported
    eval_every_epochs: int = 0
    # retries after a worker dies; each retry resumes from the last complete checkpoint
    max_failures: int = 0
    # a checkpoint directory to start from (must be complete); empty: the run's own latest, if any
    resume_from: str = ""
    # pk: P random identities from the window; hard: an anchor identity and its P-1 nearest by
    # last epoch's class centres; random: no identity structure (the baseline P×K is measured against)
    sampler: Literal["pk", "hard", "random"] = "pk"
    # identities held by the P×K window (0: 4 × P); bounds memory, widens the choice of negatives
    window_identities: int = 0
    # CPUs per read+decode task (a Ray task; the stream keeps twice the tasks its CPUs run ahead)
    data_cpus_per_task: float = 1.0
    # rows per decode task: consecutive row groups are packed until a task holds this many (a
    # task costs Ray a fixed few ms; with 128-row groups 512 beat 128, 256 and 1024 in
    # bench/data_throughput.py); rows, order and augmentation do not depend on it
    data_rows_per_task: int = 512
    # JSON lines of (rank, epoch, step, identities) per step, for checking reproducibility
    trace_file: str = ""
    # empty: <run_dir>/ray_results; a shared path or s3:// for multi-node
    storage_path: str = ""

    def validate(self) -> None:
        if self.epochs < 1:
            raise ConfigError("epochs: must be >= 1")
        if self.p < 2:
            raise ConfigError("p: a P×K batch needs at least 2 identities")
        if self.k < 2:
            raise ConfigError("k: a P×K batch needs at least 2 images per identity for positives")
        if self.num_workers < 1:
            raise ConfigError("num_workers: must be >= 1")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"zero_stage: {self.zero_stage} is not a ZeRO stage (0-3)")
        if self.cpus_per_worker <= 0 or self.gradient_accumulation_steps < 1 or self.log_every < 1:
            raise ConfigError("cpus_per_worker, gradient_accumulation_steps, log_every: must be positive")
        if self.checkpoint_every_steps < 0 or self.eval_every_epochs < 0 or self.max_failures < 0:
            raise ConfigError("checkpoint_every_steps, eval_every_epochs, max_failures: must be >= 0")
        if self.window_identities and self.window_identities < self.p:
            raise ConfigError(f"window_identities: {self.window_identities} is smaller than p={self.p}")
        if self.data_cpus_per_task <= 0:
            raise ConfigError("data_cpus_per_task: must be > 0")
        if self.data_rows_per_task < 1:
            raise ConfigError("data_rows_per_task: must be >= 1")


@dataclass
class ClipReIDConfig:
    """Stage-1 settings and the stage-2 image→text loss weight (CLIP-ReID's ViT-B/16 recipe by default)."""

    stage1_epochs: int = 120
    stage1_lr: float = 3.5e-4
    stage1_weight_decay: float = 1e-4
    stage1_warmup_epochs: float = 5.0
    # images per worker per stage-1 step (drawn at random, not P×K)
    stage1_batch: int = 64
    n_ctx: int = 4
    noun: str = "person"
    i2t_weight: float = 1.0
    # the tiny text tower used when model.open_clip_model is empty (tests, CPU demo)
    text_width: int = 64
    text_layers: int = 1
    text_heads: int = 2

    def validate(self) -> None:
        if self.stage1_epochs < 0 or self.stage1_batch < 2 or self.n_ctx < 1:
            raise ConfigError("stage1_epochs >= 0, stage1_batch >= 2, n_ctx >= 1")
        if self.stage1_lr <= 0 or self.i2t_weight < 0:
            raise ConfigError("stage1_lr must be > 0 and i2t_weight >= 0")
        if self.text_width % self.text_heads:
            raise ConfigError(f"text_width: {self.text_width} is not divisible by text_heads={self.text_heads}")


@dataclass
class TrainJobConfig:
    run_dir: str = "runs/demo"
    # empty: <run_dir>/data
    data_dir: str = ""
    transform: TransformConfig = field(default_factory=TransformConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    # baseline: one stage (ID + triplet); clipreid: prompt learning (stage 1), then image
    # fine-tuning with the identity text features as an extra loss (stage 2 = `train.epochs`)
    recipe: Literal["baseline", "clipreid"] = "baseline"
    clipreid: ClipReIDConfig = field(default_factory=ClipReIDConfig)
    run_name: str = "train"

    def validate(self) -> None:
        if not self.run_dir:
            raise ConfigError("run_dir: must not be empty")
        if self.recipe == "clipreid" and self.model.feature != "proj":
            # stage 2's i2t term compares the image feature with CLIP's projected text features
            raise ConfigError(f"model.feature: {self.model.feature!r}; recipe=clipreid trains the projected "
                              "feature (proj)")
        if self.model.shard_classifier:
            if self.train.zero_stage == 3:
                # ZeRO-3 would partition the backbone's parameters; the head is outside the engine
                # and its feature all-gather is not written for partitioned forward passes
                raise ConfigError("train.zero_stage: 3 with model.shard_classifier=true is not supported; "
                                  "use zero_stage 0-2 (the sharded head already divides the ID table)")
            if self.train.sampler == "hard":
                raise ConfigError("train.sampler: hard reads every class centre each epoch, which the sharded "
                                  "head does not hold on one worker; use sampler=pk with model.shard_classifier")
