"""Where a training run starts again: resume_from, a damaged newest checkpoint, a finished run.

The first tests build checkpoint directories by hand (no Ray); the last ones run the training
job for real and damage, reuse and re-run its checkpoints.
"""

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from reidscale.train.checkpoint import CheckpointError, write_rank_listing, write_state
from reidscale.train.recovery import RunFinishedError, describe, find_resume_point
from reidscale.train.state import TrainState

REPO = Path(__file__).resolve().parents[1]


def _checkpoint(root: Path, name: str, epoch: int, step_in_epoch: int = 0, world: int = 2) -> Path:
    d = root / name
    d.mkdir(parents=True)
    for rank in range(world):
        (d / f"weights-{rank}.pt").write_bytes(os.urandom(64))
        write_rank_listing(d, rank)
    write_state(d, TrainState(epoch=epoch, step_in_epoch=step_in_epoch, global_step=10 * epoch + step_in_epoch,
                              world_size=world, mlflow_run_id="abc").to_json())
    return d


def test_newest_complete_checkpoint_is_chosen(tmp_path):
    _checkpoint(tmp_path, "checkpoint_2026-01-01_00-00-01.000000", 1)
    newest = _checkpoint(tmp_path, "checkpoint_2026-01-01_00-00-02.000000", 2)
    point = find_resume_point(str(tmp_path), "", epochs=5, run_name="r")
    assert point.how == "latest" and point.path == str(newest) and point.state.epoch == 2
    assert len(point.existing) == 2
    assert describe(point).startswith("resuming from")


def test_damaged_newest_checkpoint_falls_back_to_the_previous_complete_one(tmp_path):
    older = _checkpoint(tmp_path, "checkpoint_2026-01-01_00-00-01.000000", 1)
    newest = _checkpoint(tmp_path, "checkpoint_2026-01-01_00-00-02.000000", 2)
    with open(newest / "weights-1.pt", "r+b") as fh:
        fh.truncate(10)
    point = find_resume_point(str(tmp_path), "", epochs=5, run_name="r")
    assert point.how == "fallback" and point.path == str(older)
    line = describe(point)
    assert "damaged" in line and "weights-1.pt" in line and str(older) in line and "\n" not in line


def test_no_complete_checkpoint_is_refused_naming_the_newest_problem(tmp_path):
    d = _checkpoint(tmp_path, "checkpoint_2026-01-01_00-00-01.000000", 1)
    (d / "reidscale_state.json").unlink()
    with pytest.raises(CheckpointError, match="none of the 1 checkpoints .* is complete.*never completed"):
        find_resume_point(str(tmp_path), "", epochs=5, run_name="r")


def test_a_finished_run_is_refused_with_how_to_go_on(tmp_path):
    _checkpoint(tmp_path, "checkpoint_2026-01-01_00-00-01.000000", 3)
    with pytest.raises(RunFinishedError, match=r"already finished 3 epochs.*run_name=NEW_NAME.*train.epochs=N \(N > 3\)"):
        find_resume_point(str(tmp_path), "", epochs=3, run_name="r")
    # mid-epoch of the last epoch is not finished
    other = tmp_path / "other"
    _checkpoint(other, "checkpoint_2026-01-01_00-00-01.000000", 2, step_in_epoch=4)
    assert find_resume_point(str(other), "", epochs=3, run_name="r").how == "latest"


def test_resume_from_refuses_a_run_name_that_has_checkpoints_of_its_own(tmp_path):
    given = _checkpoint(tmp_path / "elsewhere", "ck", 1)
    run = tmp_path / "run"
    _checkpoint(run, "checkpoint_2026-01-01_00-00-01.000000", 1)
    with pytest.raises(CheckpointError, match="already has 1 checkpoint"):
        find_resume_point(str(run), str(given), epochs=3, run_name="r")
    point = find_resume_point(str(tmp_path / "fresh"), str(given), epochs=3, run_name="r")
    assert point.how == "resume_from" and point.state.epoch == 1


# --- the training job, for real ---------------------------------------------------------------
# CLIP-ReID's two stages, so every way of going on also checks that stage 1 is not redone
# (its text features come from the run dir, or from the checkpoint a new run starts from)

TOY = [
    "recipe=clipreid", "clipreid.stage1_epochs=1", "clipreid.stage1_batch=8",
    "transform.height=32", "transform.width=16", "transform.pad=2",
    "model.width=32", "model.layers=1", "model.heads=2", "model.embed_dim=16",
    "train.p=4", "train.k=2", "train.num_workers=2", "train.cpus_per_worker=0.5",
    "train.log_every=1", "train.checkpoint_every_steps=3", "optim.warmup_epochs=0",
]


def _job(script, *args, timeout=600):
    return subprocess.run([sys.executable, str(REPO / "jobs" / script), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout)


def _runs(run_dir: Path) -> list[tuple[str, str]]:
    with sqlite3.connect(run_dir / "mlflow.db") as db:
        return db.execute("select run_uuid, status from runs order by start_time").fetchall()


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("recovery")
    prep = _job("prepare_data.py", f"out_dir={root / 'data'}", "synthetic.num_identities=24", "synthetic.height=32",
                "synthetic.width=16", "synthetic.images_per_identity_median=6", "rows_per_group=16", timeout=300)
    assert prep.returncode == 0, prep.stderr
    args = [f"run_dir={root / 'run'}", f"data_dir={root / 'data'}", *TOY]
    proc = _job("train_clipreid.py", *args, "train.epochs=1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "stage 1 epoch 1/1" in proc.stdout + proc.stderr
    assert (root / "run" / "clipreid" / "text_features.safetensors").is_file()
    return root, args


def _text_features(path: Path):
    return load_file(str(path))["text_features"]


def test_rerunning_a_finished_run_is_refused_and_changes_nothing(first_run):
    root, args = first_run
    run_dir = root / "run"
    before_runs = _runs(run_dir)
    config = run_dir / "models" / "trained" / "config.json"
    before_config = config.read_bytes()
    proc = _job("train_clipreid.py", *args, "train.epochs=1")
    assert proc.returncode == 1
    errors = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert errors[-1].startswith("error: run 'train' already finished 1 epochs"), proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert _runs(run_dir) == before_runs  # no new MLflow run, none left RUNNING
    assert config.read_bytes() == before_config


def test_resume_from_a_complete_checkpoint_starts_a_new_run_there(first_run):
    root, args = first_run
    summary = json.loads((root / "run" / "train_summary.json").read_text())
    checkpoint = summary["checkpoint"]
    steps_done = summary["final"]["global_step"]
    run_args = [a for a in args if not a.startswith("run_dir=")] + [f"run_dir={root / 'from_ckpt'}"]
    proc = _job("train_clipreid.py", *run_args, "train.epochs=2", f"train.resume_from={checkpoint}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert f"starting from checkpoint {checkpoint} at epoch 2, step 0" in out
    # stage 2 goes on against the text features it was trained with, taken from the checkpoint
    assert f"stage 1 already done: text features from checkpoint {checkpoint}" in out
    assert "stage 1 epoch" not in out
    first = _text_features(root / "run" / "clipreid" / "text_features.safetensors")
    assert torch.equal(_text_features(root / "from_ckpt" / "clipreid" / "text_features.safetensors"), first)
    resumed = json.loads((root / "from_ckpt" / "train_summary.json").read_text())
    assert resumed["started_from"] == "resume_from"
    assert resumed["final"]["epoch"] == 2
    # the second epoch continued the global step count of the checkpoint, it did not start over
    assert resumed["final"]["global_step"] > steps_done
    assert resumed["final"]["global_step"] - steps_done <= steps_done + 2
    assert not (root / "from_ckpt" / "models" / "untrained").exists()  # no untrained export: it was trained


def test_damaged_newest_checkpoint_falls_back_and_logs_into_the_same_mlflow_run(first_run):
    root, args = first_run
    run_dir = root / "run"
    first_id = json.loads((run_dir / "train_summary.json").read_text())["run_id"]
    checkpoints = sorted(p for p in (run_dir / "ray_results" / "train").glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2, checkpoints
    victim = max((p for p in checkpoints[-1].rglob("*") if p.is_file() and p.suffix == ".pt"),
                 key=lambda p: p.stat().st_size)
    with open(victim, "r+b") as fh:
        fh.truncate(victim.stat().st_size // 2)
    proc = _job("train_clipreid.py", *args, "train.epochs=2")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert f"the newest checkpoint is damaged ({checkpoints[-1]}" in out
    assert f"resuming from the newest complete one, {checkpoints[0]}" in out
    assert "stage 1 already done" in out and "stage 1 epoch" not in out
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["run_id"] == first_id and summary["started_from"] == "fallback"
    assert summary["final"]["epoch"] == 2
    statuses = dict(_runs(run_dir))
    assert statuses == {first_id: "FINISHED"}


def test_a_job_that_fails_before_training_leaves_no_running_mlflow_run(first_run, tmp_path):
    root, args = first_run
    run_args = [a for a in args if not a.startswith(("run_dir=", "train.num_workers"))]
    proc = _job("train_clipreid.py", f"run_dir={tmp_path}", *run_args, "train.num_workers=50", timeout=300)
    assert proc.returncode == 1
    assert "row group(s) for train.num_workers=50" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists() or all(s != "RUNNING" for _, s in _runs(tmp_path))
