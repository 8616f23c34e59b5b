"""A worker killed with SIGKILL mid-epoch: the run resumes from its last checkpoint and
replays exactly the batches an uninterrupted run would have seen."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_recovery import _runs as mlflow_runs  # (run id, status) of every run in a run dir's mlflow.db

REPO = Path(__file__).resolve().parents[1]
TOY = [
    "transform.height=32", "transform.width=16", "transform.pad=2",
    "model.width=32", "model.layers=1", "model.heads=2", "model.embed_dim=16",
    "train.epochs=2", "train.p=4", "train.k=2", "train.num_workers=2", "train.cpus_per_worker=0.5",
    "train.log_every=1", "train.checkpoint_every_steps=4", "optim.warmup_epochs=0",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("ft")
    proc = subprocess.run(
        [sys.executable, "jobs/prepare_data.py", f"out_dir={root / 'data'}", "synthetic.num_identities=40",
         "synthetic.height=32", "synthetic.width=16", "synthetic.images_per_identity_median=8", "rows_per_group=24"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return root / "data"


def _train(run_dir, data_dir, *extra):
    return subprocess.Popen(
        [sys.executable, "jobs/train_clipreid.py", f"run_dir={run_dir}", f"data_dir={data_dir}",
         f"train.trace_file={run_dir}/trace", *TOY, *extra],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )


def _trace(run_dir, rank):
    path = Path(f"{run_dir}/trace.rank{rank}")
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_killed_worker_resumes_with_the_same_batches_and_no_double_counted_steps(tmp_path, data_dir):
    ref_dir, ft_dir = tmp_path / "ref", tmp_path / "ft"
    ref = _train(ref_dir, data_dir)
    out, _ = ref.communicate(timeout=600)
    assert ref.returncode == 0, out[-4000:]

    run = _train(ft_dir, data_dir, "train.max_failures=1")
    killed_pid = None
    deadline = time.time() + 600
    snapshot = ft_dir / "ray_results" / "train" / "checkpoint_manager_snapshot.json"
    registered = 0
    while run.poll() is None and time.time() < deadline:
        entries = _trace(ft_dir, 1)
        if killed_pid is None and snapshot.exists():
            try:
                latest = json.loads(snapshot.read_text())["latest_checkpoint_result"]
            except (json.JSONDecodeError, KeyError, TypeError):
                latest = None
            # kill once Ray Train has registered a mid-epoch checkpoint (it polls workers every 2 s)
            if latest and latest["metrics"]["global_step"] >= 4 and entries and entries[-1]["epoch"] == 0:
                registered = latest["metrics"]["global_step"]
                killed_pid = entries[-1]["pid"]
                os.kill(killed_pid, signal.SIGKILL)
        time.sleep(0.05)
    out, _ = run.communicate(timeout=600)
    assert killed_pid is not None, "the run finished before a worker could be killed"
    assert run.returncode == 0, out[-4000:]

    for rank in (0, 1):
        reference = {e["step"]: e["row_ids"] for e in _trace(ref_dir, rank)}
        attempts = _trace(ft_dir, rank)
        assert len({e["pid"] for e in attempts}) == 2, "the worker group was not restarted"
        assert {e["step"] for e in attempts} == set(reference)
        for e in attempts:  # before and after the restart, every step drew the reference batch
            assert e["row_ids"] == reference[e["step"]], f"rank {rank} step {e['step']} differs after resume"
        replayed = [e["step"] for e in attempts if e["pid"] != attempts[0]["pid"]]
        resumed_after = min(replayed) - 1
        assert resumed_after >= registered and resumed_after % 4 == 0, \
            f"resumed after step {resumed_after}, not from the checkpoint registered at step {registered}"

    from mlflow.tracking import MlflowClient

    summary = json.loads((ft_dir / "train_summary.json").read_text())
    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    steps = [m.step for m in client.get_metric_history(summary["run_id"], "loss")]
    assert len(steps) == len(set(steps)), "a step was logged twice"
    assert sorted(steps) == sorted(_trace(ref_dir, 0)[i]["step"] for i in range(len(_trace(ref_dir, 0))))


def test_resume_from_an_incomplete_checkpoint_fails_loudly(tmp_path, data_dir):
    broken = tmp_path / "broken_ckpt"
    broken.mkdir()
    (broken / "latest").write_text("state")
    proc = subprocess.run(
        [sys.executable, "jobs/train_clipreid.py", f"run_dir={tmp_path / 'run'}", f"data_dir={data_dir}",
         f"train.resume_from={broken}", *TOY],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    assert "never completed" in proc.stderr
    # an error a user can act on: one line naming the checkpoint, last, and no traceback
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert str(broken) in last and "never completed" in last, proc.stderr[-3000:]
    # the MLflow run it may have opened is marked failed, not left RUNNING (or none was opened)
    run_dir = tmp_path / "run"
    assert not (run_dir / "mlflow.db").exists() or all(s != "RUNNING" for _, s in mlflow_runs(run_dir))
