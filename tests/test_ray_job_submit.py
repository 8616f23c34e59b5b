"""`ray job submit` against a real local head started by clusters/local/start.sh."""

import json
import os
import shutil
import subprocess
import sys
import tempfile
import urllib.request
import uuid
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DASHBOARD_PORT = 8291


@pytest.fixture(scope="module")
def head():
    # Ray's socket paths must stay short, so not pytest's long tmp_path
    temp_dir = Path(tempfile.mkdtemp(prefix="rs-", dir="/tmp"))
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(temp_dir / "auth_token"),
        "RAY_PORT": "6391",
        "RAY_DASHBOARD_PORT": str(DASHBOARD_PORT),
        # the defaults (52365, 10001) are taken by any other head on the machine
        "RAY_DASHBOARD_AGENT_PORT": "52391",
        "RAY_CLIENT_PORT": "23391",
        "RAY_NUM_CPUS": "2",
        "RAY_TEMP_DIR": str(temp_dir / "ray"),
    }
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.run(["bash", str(REPO / "clusters/local/start.sh")], env=env, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    try:
        yield env, temp_dir
    finally:
        subprocess.run(["bash", str(REPO / "clusters/local/stop.sh")], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit(env, *entrypoint, options=(), timeout=900):
    return subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{DASHBOARD_PORT}",
         "--working-dir", str(REPO), *options, "--", *entrypoint],
        env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO,
    )


def _dashboard_job(temp_dir, submission_id: str) -> dict:
    """The row the dashboard's Jobs page shows for a submission: it renders /api/jobs/, the
    Name column from ``metadata.job_name`` ("-" without it), Job ID from ``driver_info.id``."""
    token = (temp_dir / "auth_token").read_text().strip()
    request = urllib.request.Request(f"http://127.0.0.1:{DASHBOARD_PORT}/api/jobs/",
                                     headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(request, timeout=30) as response:
        jobs = json.load(response)
    return next(job for job in jobs if job.get("submission_id") == submission_id)


def test_dashboard_listens_on_loopback_only(head):
    out = subprocess.run(["ss", "-ltnH"], capture_output=True, text=True).stdout
    listeners = [line.split()[3] for line in out.splitlines() if line.split()[3].endswith(f":{DASHBOARD_PORT}")]
    assert listeners and all(addr.startswith("127.0.0.1:") for addr in listeners), listeners


def test_submission_without_the_token_is_refused(head, tmp_path):
    env, _ = head
    no_token = {k: v for k, v in env.items() if k not in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH")}
    no_token["HOME"] = str(tmp_path)  # no ~/.ray/auth_token to fall back on (and removed by pytest)
    proc = _submit(no_token, "python", "-c", "print('should not run')", timeout=120)
    assert proc.returncode != 0
    assert "Authentication" in proc.stdout + proc.stderr


def test_train_job_runs_through_ray_job_submit(head):
    env, temp_dir = head
    run_dir = temp_dir / f"run-{uuid.uuid4().hex[:6]}"
    prep = subprocess.run(
        [sys.executable, "jobs/prepare_data.py", f"run_dir={run_dir}", "synthetic.num_identities=24",
         "synthetic.height=32", "synthetic.width=16", "synthetic.images_per_identity_median=6", "rows_per_group=16"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert prep.returncode == 0, prep.stderr
    # as README documents for a submitted job: a submission's row shows the submission's own
    # metadata, and Ray's job supervisor overrides the driver's job_name with the submission id
    submission_id = f"train-{run_dir.name}"
    proc = _submit(
        env, "python", "jobs/train_clipreid.py", f"run_dir={run_dir}",
        "transform.height=32", "transform.width=16", "model.width=32", "model.layers=1", "model.heads=2",
        "model.embed_dim=16", "train.epochs=1", "train.p=4", "train.k=2", "train.num_workers=1",
        "train.cpus_per_worker=0.5", "train.log_every=1",
        options=("--submission-id", submission_id, "--metadata-json", json.dumps({"job_name": "train-train"})),
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "succeeded" in proc.stdout + proc.stderr
    row = _dashboard_job(temp_dir, submission_id)
    # Name column: the same name as the MLflow run (train-<run_name>); Job ID: the driver that ran
    assert row["metadata"]["job_name"] == "train-train", row
    assert row["status"] == "SUCCEEDED" and (row.get("driver_info") or {}).get("id"), row
    assert row["entrypoint"].startswith("python jobs/train_clipreid.py"), row
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["final"]["epoch"] == 1
    assert (run_dir / "models" / "trained" / "model.safetensors").is_file()


def test_py_modules_ship_a_library_copy_that_worker_processes_import(head, tmp_path):
    """docs/operations.md: `--runtime-env-json '{"py_modules": [...]}'` puts a local copy of the
    library ahead of the installed one on every worker. A marker only the shipped copy has
    must show up inside a Ray task (a worker process, not the job driver)."""
    env, _ = head
    marker = uuid.uuid4().hex
    shipped = tmp_path / "reidscale"
    shutil.copytree(REPO / "platform" / "reidscale", shipped, ignore=shutil.ignore_patterns("__pycache__"))
    with open(shipped / "__init__.py", "a") as f:
        f.write(f"\nSHIPPED_MARKER = {marker!r}\n")
    script = (
        "import os, ray\n"
        "ray.init()\n"
        "@ray.remote\n"
        "def probe():\n"
        "    import reidscale\n"
        "    return os.getpid(), getattr(reidscale, 'SHIPPED_MARKER', 'installed copy'), reidscale.__file__\n"
        "pid, mark, path = ray.get(probe.remote())\n"
        "print('PROBE', pid != os.getpid(), mark, path)\n"
    )
    proc = subprocess.run(
        [str(BIN / "ray"), "job", "submit", "--address", f"http://127.0.0.1:{DASHBOARD_PORT}",
         "--runtime-env-json", json.dumps({"py_modules": [str(shipped)]}), "--", "python", "-c", script],
        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    probe = next(line for line in proc.stdout.splitlines() if line.startswith("PROBE"))
    _, in_worker, mark, path = probe.split()
    assert in_worker == "True" and mark == marker, probe
    assert not path.startswith(str(REPO)), path


PG_DRIVER = """
import os, sys, time
from pathlib import Path
import ray.train
from ray.train.torch import TorchConfig
from reidscale.ray_runtime import init_ray
from reidscale.train.trainer import JobScopedTorchTrainer

out = Path(sys.argv[1])
init_ray()
(out / "driver.pid").write_text(str(os.getpid()))

def loop(config):
    Path(config["out"], "training").write_text("1")
    time.sleep(600)

JobScopedTorchTrainer(loop, train_loop_config={"out": str(out)},
                      scaling_config=ray.train.ScalingConfig(num_workers=1, resources_per_worker={"CPU": 1}),
                      torch_config=TorchConfig(backend="gloo"),
                      run_config=ray.train.RunConfig(name="pg", storage_path=str(out / "results"))).fit()
"""
PG_STATES = """
import json, ray
from reidscale.ray_runtime import init_ray
init_ray()
print("PG", json.dumps(sorted(v["state"] for v in ray.util.placement_group_table().values())))
"""


def _placement_group_states(env) -> list[str]:
    proc = subprocess.run([sys.executable, "-c", PG_STATES], env={**env, "RAY_ADDRESS": f"127.0.0.1:{env['RAY_PORT']}"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(next(ln for ln in proc.stdout.splitlines() if ln.startswith("PG "))[3:])


def test_a_killed_drivers_training_placement_group_goes_with_its_job(head, tmp_path):
    """reidscale.train.trainer leaves Ray Train's detached placement-group cleaner out because a
    group that is not detached lives as long as its job: SIGKILL the driver mid-training and
    Ray must mark the run's group REMOVED with no cleaner running."""
    import signal
    import time

    env, _ = head
    proc = _submit(env, "python", "-c", PG_DRIVER, str(tmp_path), options=("--no-wait",), timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    deadline = time.monotonic() + 240
    while not (tmp_path / "training").exists():
        assert time.monotonic() < deadline, "the training loop never started"
        time.sleep(1)
    assert "CREATED" in _placement_group_states(env)  # the run holds its group while it trains
    os.kill(int((tmp_path / "driver.pid").read_text()), signal.SIGKILL)
    deadline = time.monotonic() + 120
    while "CREATED" in (states := _placement_group_states(env)):
        assert time.monotonic() < deadline, f"the dead job's placement group is still there: {states}"
        time.sleep(2)
    assert "REMOVED" in states
