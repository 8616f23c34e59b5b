"""What crosses process boundaries in training: the driver's plan for the workers, and the
state a checkpoint restores.

Both are dataclasses so a misspelt field fails where it is written (at the driver), not
inside a Ray worker minutes later.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from reidscale.data.pipeline import RowGroup
from reidscale.train.config import TrainJobConfig


@dataclass(frozen=True)
class WorkerPlan:
    """Everything a training worker needs from the driver (passed through ``train_loop_config``)."""

    cfg: TrainJobConfig
    num_classes: int
    # estimated P×K steps per epoch per worker (corrected after the first epoch)
    steps_per_epoch: int
    stage1_steps_per_epoch: int
    # the train split's row groups (path, group, rows), in manifest order
    row_groups: list[RowGroup]
    run_id: str
    tracking_uri: str
    # the checkpoint to start from when Ray Train offers none newer than the run had at launch
    # (None: from scratch); chosen and verified by the driver (recovery.find_resume_point)
    resume_path: str | None = None
    # names of the checkpoint directories that existed when the driver started: a checkpoint
    # Ray Train restores from storage with one of these names is superseded by resume_path;
    # any other is one this run wrote before a worker failure, and is the one to continue from
    stale_checkpoints: tuple[str, ...] = ()


@dataclass
class TrainState:
    """What a checkpoint restores (``reidscale_state.json``)."""

    epoch: int = 0
    step_in_epoch: int = 0
    global_step: int = 0
    world_size: int = 1
    steps_per_epoch: int = 1
    best_mAP: float = -1.0
    decode_errors: int = 0
    # the MLflow run a resumed run keeps logging into
    mlflow_run_id: str = ""
    # stage-2 epochs this run was configured for when the checkpoint was written
    epochs: int = 0
    # seconds one validation pass took (for the ETA); 0 until one has run
    validation_seconds: float = 0.0

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, values: dict) -> "TrainState":
        """Tolerates checkpoints written before a field existed (their default applies)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


@dataclass
class EpochStats:
    loss_sum: float = 0.0
    steps: int = 0
    images: int = 0
    seconds: float = 0.0
    # where the epoch ended: its steps counted from the epoch's start, replayed ones included
    step_in_epoch: int = 0
