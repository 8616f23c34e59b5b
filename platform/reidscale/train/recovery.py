"""Where a training run starts: from scratch, from its own newest complete checkpoint, or
from a checkpoint the user names. Decided by the driver, before Ray or MLflow start.

Ray Train keeps a run's checkpoints under ``<storage>/<run_name>/checkpoint_*`` and, given the
same run name again, offers the newest one it registered to the workers. That one can be
damaged (a truncated file) while an older one is intact, and Ray Train V2 no longer takes a
``resume_from_checkpoint``. So the driver looks itself: it verifies the newest, falls back to
the newest complete one, and hands its choice to the workers (``WorkerPlan.resume_path``).
A run that already trained every epoch it was asked for is refused instead of re-run.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

from reidscale.train.checkpoint import CheckpointError, verify_complete
from reidscale.train.state import TrainState

log = logging.getLogger(__name__)


class RunFinishedError(CheckpointError):
    """The run's checkpoint has every epoch the config asks for: nothing to train."""


@dataclass
class ResumePoint:
    # the checkpoint directory to load (None: train from scratch)
    path: str | None = None
    state: TrainState | None = None
    # fresh | latest | fallback | resume_from | storage (remote storage: Ray Train's own choice)
    how: str = "fresh"
    # one line per newer checkpoint that was skipped, with the reason
    skipped: list[str] = field(default_factory=list)
    # names of every checkpoint directory the run had when the driver looked
    existing: tuple[str, ...] = ()


def checkpoint_dirs(run_storage: str | Path) -> list[Path]:
    """Ray Train's checkpoint directories of one run, oldest first (their names are timestamps)."""
    root = Path(run_storage)
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.is_dir() and p.name.startswith("checkpoint_"))


def _refuse_finished(state: TrainState, where: str, epochs: int, run_name: str) -> None:
    if state.epoch >= epochs and state.step_in_epoch == 0:
        raise RunFinishedError(
            f"run {run_name!r} already finished {state.epoch} epochs ({where}); start a new run with "
            f"run_name=NEW_NAME, or train it further with train.epochs=N (N > {state.epoch})")


def find_resume_point(run_storage: str, resume_from: str, *, epochs: int, run_name: str) -> ResumePoint:
    """Choose and verify the checkpoint a run starts from; raise CheckpointError (one line) if none fits."""
    if "://" in run_storage:
        # remote storage: Ray Train offers its newest registered checkpoint; the workers verify it
        if resume_from:
            state = TrainState.from_json(verify_complete(resume_from))
            _refuse_finished(state, resume_from, epochs, run_name)
            return ResumePoint(resume_from, state, "resume_from")
        return ResumePoint(how="storage")
    found = checkpoint_dirs(run_storage)
    existing = tuple(p.name for p in found)
    if resume_from:
        if found:
            raise CheckpointError(
                f"train.resume_from starts a new run from a checkpoint, but run_name={run_name!r} already has "
                f"{len(found)} checkpoint(s) in {run_storage}; give a new run_name")
        state = TrainState.from_json(verify_complete(resume_from))
        _refuse_finished(state, f"checkpoint {resume_from}", epochs, run_name)
        return ResumePoint(str(Path(resume_from).resolve()), state, "resume_from", existing=existing)
    skipped = []
    for path in reversed(found):
        try:
            state = TrainState.from_json(verify_complete(path))
        except CheckpointError as exc:
            skipped.append(str(exc))
            continue
        _refuse_finished(state, f"checkpoint {path}", epochs, run_name)
        return ResumePoint(str(path), state, "fallback" if skipped else "latest", skipped, existing)
    if found:
        raise CheckpointError(
            f"none of the {len(found)} checkpoints of run {run_name!r} in {run_storage} is complete (newest: "
            f"{skipped[0]}); start a new run with run_name=NEW_NAME, or give a good one with train.resume_from=DIR")
    return ResumePoint(existing=existing)


def describe(point: ResumePoint) -> str | None:
    """The one line a user sees about where training starts (None when it starts from scratch)."""
    if point.how in ("fresh", "storage"):
        return None
    s = point.state
    where = f"epoch {s.epoch + 1}, step {s.step_in_epoch} of it (global step {s.global_step})"
    if point.how == "fallback":
        return (f"the newest checkpoint is damaged ({point.skipped[0]}); resuming from the newest complete one, "
                f"{point.path}, at {where}")
    if point.how == "resume_from":
        return f"starting from checkpoint {point.path} at {where}"
    return f"resuming from {point.path} at {where}"
