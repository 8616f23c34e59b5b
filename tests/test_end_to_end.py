"""The whole pipeline at toy size, through the job entry points a user runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TOY_TRAIN = [
    "transform.height=32", "transform.width=16", "transform.pad=2",
    "model.width=32", "model.layers=1", "model.heads=2", "model.patch_size=8", "model.embed_dim=32",
    "train.epochs=2", "train.p=4", "train.k=4", "train.num_workers=2", "train.cpus_per_worker=0.5",
    "train.log_every=2", "optim.lr=0.003", "optim.warmup_epochs=0",
]


def run_job(script, *args, env=None):
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / script), *args],
        cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, f"{script} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"
    return proc


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    run_job("prepare_data.py", f"run_dir={run_dir}", "synthetic.num_identities=40", "synthetic.height=32",
            "synthetic.width=16", "synthetic.images_per_identity_median=8", "rows_per_group=24")
    proc = run_job("train_clipreid.py", f"run_dir={run_dir}", *TOY_TRAIN, "--json")
    return run_dir, proc


def test_training_exports_models_checkpoints_and_logs_to_mlflow(trained):
    run_dir, proc = trained
    summary = json.loads((run_dir / "train_summary.json").read_text())
    assert summary["final"]["epoch"] == 2
    # --json: stdout is the summary alone, though Ray relays the workers' output meanwhile
    assert json.loads(proc.stdout)["run_id"] == summary["run_id"]
    for name in ("untrained", "trained"):
        assert (run_dir / "models" / name / "model.safetensors").is_file()
    assert summary["checkpoint"] and Path(summary["checkpoint"]).is_dir()
    # the progress lines reach the job log
    assert "img/s/worker" in proc.stdout + proc.stderr

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=summary["tracking_uri"])
    run = client.get_run(summary["run_id"])
    assert run.data.params["train.p"] == "4"
    assert run.data.params["model.embed_dim"] == "32"
    assert run.info.run_name.startswith("train-") and run.info.status == "FINISHED"
    inputs = {d.dataset.name: json.loads(d.dataset.source) for d in run.inputs.dataset_inputs}
    assert [n.rsplit("/", 1)[1] for n in inputs] == ["train"]
    assert Path(next(iter(inputs.values()))["uri"]) == (run_dir / "data" / "manifest.json").resolve()
    # model-last is an MLflow model of this run that embeds as the export does
    import mlflow
    import numpy as np
    import pandas as pd

    from reidscale.embed import embed_images

    logged = summary["logged_models"]["model-last"]
    from reidscale.data.shards import split_files
    import pyarrow.parquet as pq

    images = pq.read_table(split_files(run_dir / "data", "query")[0], columns=["image"]).column("image").to_pylist()[:3]
    expected, ok = embed_images(run_dir / "models" / "trained", images)
    assert ok.all()
    mlflow.set_tracking_uri(summary["tracking_uri"])  # a models:/<id> URI resolves in the run's store
    got = np.asarray(mlflow.pyfunc.load_model(logged["model_uri"]).predict(pd.DataFrame({"image": images})))
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-5)
    losses = client.get_metric_history(summary["run_id"], "loss")
    assert len(losses) >= 2
    epoch_losses = [m.value for m in client.get_metric_history(summary["run_id"], "epoch_loss")]
    assert len(epoch_losses) == 2 and epoch_losses[1] < epoch_losses[0]
    artifacts = {a.path for a in client.list_artifacts(summary["run_id"])}
    assert {"train_config.yaml", "train_summary.json", "manifest.json"} <= artifacts


def test_index_and_evaluation_compare_untrained_and_trained(trained):
    run_dir, _ = trained
    # the untrained model is evaluated on its own embeddings; only the trained one gets an index
    # (the same job twice would only cost the suite another Ray start and embedding pass)
    run_job("build_index.py", f"run_dir={run_dir}", f"model_dir={run_dir / 'models' / 'trained'}")
    for name in ("untrained", "trained"):
        proc = run_job("evaluate.py", f"run_dir={run_dir}", f"model_dir={run_dir / 'models' / name}", f"label={name}",
                       *(["through_index=true"] if name == "trained" else []))
    assert proc.stdout.strip().splitlines()[-1].startswith("MLflow: mlflow ui --backend-store-uri sqlite:///")
    assert "gallery embeddings from index" in proc.stdout and "(sha256 checked)" in proc.stdout
    emb = json.loads((run_dir / "index" / "trained" / "manifest.json").read_text())["embeddings"]
    assert set(emb["sha256"]) == set(emb["files"])  # what evaluate checks the stored embeddings against
    open_set = json.loads((run_dir / "index" / "trained" / "open_set.json").read_text())
    assert open_set == json.loads((run_dir / "eval" / "trained" / "open_set.json").read_text())
    assert open_set["metric"] == "ip" and open_set["label"] == "trained" and open_set["genuine_pairs"] > 0
    assert all((run_dir / "eval" / f).stat().st_size > 1000 for f in ("cmc_all.png", "roc_all.png"))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary) == {"untrained", "trained"}
    for m in summary.values():
        assert 0.0 <= m["mAP"] <= 1.0 and 0.0 <= m["rank1"] <= 1.0
        assert m["num_valid_queries"] > 0
    # a Flat demo index at 100 candidates: through-index Rank-1 is the exact one
    assert abs(summary["trained"]["index_rank1"] - summary["trained"]["rank1"]) <= 0.01
    assert (run_dir / "eval" / "trained" / "cmc.png").stat().st_size > 1000

    # MLflow: one run per evaluated model, same standard keys, linked to the training run
    from mlflow.tracking import MlflowClient

    train = json.loads((run_dir / "train_summary.json").read_text())
    client = MlflowClient(tracking_uri=train["tracking_uri"])
    exp = client.get_run(train["run_id"]).info.experiment_id
    runs = {r.info.run_name: r for r in client.search_runs([exp])}
    assert {"evaluate-untrained", "evaluate-trained", "build_index-trained"} <= set(runs)
    for name in ("untrained", "trained"):
        ev = runs[f"evaluate-{name}"]
        built = [runs["build_index-trained"]] if name == "trained" else []
        assert ev.info.status == "FINISHED" and ev.data.tags["reidscale.label"] == name
        assert {"rank1", "rank5", "rank10", "mAP", "mINP", "eer", "tar_at_far_1e-3"} <= set(ev.data.metrics)
        assert ev.data.metrics["mAP"] == pytest.approx(summary[name]["mAP"])
        assert ev.data.metrics["tar_at_far_1e-3"] == pytest.approx(summary[name]["tar_at_far_1e-3"])
        sha = json.loads((run_dir / "models" / name / "config.json").read_text())["weights_sha256"]
        for r in (ev, *built):
            assert r.data.tags["reidscale.train_run_id"] == train["run_id"]
            assert r.data.tags["reidscale.model_sha256"] == sha
        assert sorted(d.dataset.name.rsplit("/", 1)[1] for d in ev.inputs.dataset_inputs) == ["gallery", "query"]
    assert "eval_trained_mAP" not in client.get_run(train["run_id"]).data.metrics  # not inside the training run

    from reidscale.index.gallery import Gallery

    gallery = Gallery(run_dir / "index" / "trained")
    manifest = json.loads((run_dir / "data" / "manifest.json").read_text())
    assert gallery.ntotal == manifest["splits"]["gallery"]["images"]


def test_a_bad_config_is_refused_before_any_work(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "train_clipreid.py"), f"run_dir={tmp_path}", "train.zero_stage=9"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "train.zero_stage" in proc.stderr
    assert not any(tmp_path.iterdir())


def test_training_refuses_a_dataset_without_manifest(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "train_clipreid.py"), f"run_dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert "manifest.json does not exist" in proc.stderr
