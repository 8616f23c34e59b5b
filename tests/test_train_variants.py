"""The same job under other settings: ZeRO 2/3, bf16, gradient accumulation, samplers, Partial FC, SIE."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
TOY = [
    "transform.height=32", "transform.width=16", "transform.pad=2",
    "model.width=32", "model.layers=1", "model.heads=2", "model.embed_dim=16",
    "train.epochs=1", "train.p=4", "train.k=2", "train.num_workers=2", "train.cpus_per_worker=0.5",
    "train.log_every=1",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("variants") / "data"
    proc = subprocess.run(
        [sys.executable, "jobs/prepare_data.py", f"out_dir={root}", "synthetic.num_identities=24",
         "synthetic.height=32", "synthetic.width=16", "synthetic.images_per_identity_median=6", "rows_per_group=16"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    return root


def _train(run_dir, data_dir, *settings):
    proc = subprocess.run(
        [sys.executable, "jobs/train_clipreid.py", f"run_dir={run_dir}", f"data_dir={data_dir}", *TOY, *settings],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads((run_dir / "train_summary.json").read_text())


def _assert_full_weights_that_trained(run_dir):
    trained = load_file(str(run_dir / "models" / "trained" / "model.safetensors"))
    untrained = load_file(str(run_dir / "models" / "untrained" / "model.safetensors"))
    assert trained.keys() == untrained.keys()
    # full, gathered tensors (ZeRO-3 partitions would be empty or flat) that training changed
    for name, tensor in trained.items():
        assert tensor.shape == untrained[name].shape, name
    assert any(not (trained[n].float() - untrained[n].float()).abs().max() < 1e-8 for n in trained)


# Each training job costs ~40 s of the suite's two cores, so one run carries several settings
# that do not interact: each run's checks are those of every setting it holds.
@pytest.mark.parametrize("settings, sampler", [
    (["train.zero_stage=2", "train.precision=bf16", "train.gradient_accumulation_steps=2", "optim.grad_clip=1.0"],
     "hard"),
    (["train.zero_stage=3"], "random"),
])
def test_zero_stages_bf16_and_samplers_train_and_export_full_weights(tmp_path, data_dir, settings, sampler):
    summary = _train(tmp_path, data_dir, *settings, "train.epochs=2", f"train.sampler={sampler}")
    assert summary["final"]["epoch"] == 2 and summary["final"]["global_step"] > 0
    _assert_full_weights_that_trained(tmp_path)
    # the hard sampler embeds the training set after epoch 1 to draw epoch 2's neighbours
    centres = list((tmp_path / "sampler").glob("centres-epoch*.npy"))
    assert [c.name for c in centres] == (["centres-epoch0001.npy"] if sampler == "hard" else [])


def test_partial_fc_and_camera_sie_train_validate_and_export(tmp_path, data_dir):
    """One run through the real job: Partial FC's sampled logits, SIE fed the batches' cameras
    (synthetic data: cameras 0..5), validation with each image's camera, an export that keeps SIE."""
    summary = _train(tmp_path, data_dir, "model.classifier=partial_fc", "model.sample_rate=0.1",
                     "model.sie_cameras=6", "train.eval_every_epochs=1")
    assert summary["final"]["global_step"] > 0 and "val_mAP" in json.dumps(summary)
    trained = load_file(str(tmp_path / "models" / "trained" / "model.safetensors"))
    untrained = load_file(str(tmp_path / "models" / "untrained" / "model.safetensors"))
    key = "backbone.sie_embed"
    assert trained[key].shape == (6, 32)
    assert (trained[key] - untrained[key]).abs().max() > 1e-6  # the camera table trained
    assert not any(k.startswith("classifier") for k in trained)  # the head is never exported


def test_workers_leaving_no_cpu_for_decode_tasks_are_refused_before_a_run_is_recorded(tmp_path, data_dir):
    """A private Ray whose CPUs the workers take (here: decode tasks asking for more CPUs than any
    machine's Ray has) is refused in one line, before the MLflow run: the workers would otherwise
    wait for batches from tasks Ray can never schedule."""
    proc = subprocess.run(
        [sys.executable, "jobs/train_clipreid.py", f"run_dir={tmp_path}", f"data_dir={data_dir}", *TOY,
         "train.data_cpus_per_task=100000"],
        cwd=REPO, capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode != 0
    errors = [line for line in proc.stderr.splitlines() if "train.data_cpus_per_task=100000" in line]
    assert len(errors) == 1 and "train.cpus_per_worker=0.5" in errors[0], proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "train_summary.json").exists()
