from pathlib import Path

import pytest

from reidscale import tracking
from reidscale.config import ConfigError, load_config
from reidscale.tracking import TrackingConfig


def test_default_store_is_sqlite_in_the_run_dir_and_artifacts_stay_beside_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may land in the working directory
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    uri = tracking.tracking_uri(TrackingConfig(), run_dir)
    assert uri == f"sqlite:///{run_dir.resolve()}/mlflow.db"
    run_id = tracking.start_run(uri, "exp", "r", params={"a": {"b": 1}})
    c = tracking.client(uri)
    tracking.log_metrics(c, run_id, {"loss": 0.5}, step=3)
    tracking.log_json_artifact(c, run_id, {"x": 1}, "s.json")
    run = c.get_run(run_id)
    assert run.data.params == {"a.b": "1"}
    assert [(m.step, m.value) for m in c.get_metric_history(run_id, "loss")] == [(3, 0.5)]
    assert (run_dir / "mlartifacts").is_dir()
    assert not (tmp_path / "mlruns").exists()
    assert tracking.ui_command(uri).startswith(f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1")


def test_file_store_uri_is_refused():
    with pytest.raises(ConfigError, match="uri"):
        load_config(TrackingConfig, None, ["uri=./mlruns"])


def test_dataset_counts_and_skipped_images_reach_mlflow(tmp_path):
    manifest = {
        "splits": {"train": {"images": 90, "identities": 9}, "query": {"images": 5, "identities": 5}},
        "skipped": {"images": 3, "of_images": 98, "error_rate": 3 / 98},
    }
    uri = tracking.tracking_uri(TrackingConfig(), tmp_path)
    run_id = tracking.start_run(uri, "exp", "r")
    c = tracking.client(uri)
    tracking.log_metrics(c, run_id, tracking.dataset_metrics(manifest), step=0)
    logged = c.get_run(run_id).data.metrics
    assert logged["data_skipped_images"] == 3
    assert logged["data_skipped_rate"] == pytest.approx(3 / 98)
    assert logged["data_train_images"] == 90 and logged["data_query_identities"] == 5
    # a clean set says so explicitly instead of leaving the metric out
    assert tracking.dataset_metrics({"splits": {}})["data_skipped_images"] == 0


def test_system_metrics_land_in_the_run_under_system_names(tmp_path):
    """tracking.system_metrics around a short stretch of work logs MLflow's monitor samples
    (``system/cpu_utilization_percentage``, memory, ...) into the run, named as MLflow names them."""
    import time

    uri = tracking.tracking_uri(TrackingConfig(), tmp_path)
    run_id = tracking.start_run(uri, "exp", "train-sysmetrics")
    monitor = tracking.system_metrics(run_id, uri, interval_s=0.2)
    assert monitor is not None, "system metrics monitor did not start (psutil missing?)"
    time.sleep(1.5)
    monitor.finish()
    c = tracking.client(uri)
    keys = set(c.get_run(run_id).data.metrics)
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes",
            "system/system_memory_usage_percentage"} <= keys, keys
    assert all(k.startswith("system/") and "system/system/" not in k for k in keys), keys
    steps = [m.step for m in c.get_metric_history(run_id, "system/cpu_utilization_percentage")]
    assert len(steps) >= 2 and steps == sorted(steps), steps


def test_metric_keys_reach_mlflow_in_its_allowed_characters(tmp_path):
    uri = tracking.tracking_uri(TrackingConfig(), tmp_path)
    run_id = tracking.start_run(uri, "exp", "r")
    c = tracking.client(uri)
    tracking.log_metrics(c, run_id, {"tar@far=0.001": 0.9, "train_id_accuracy": 0.5})
    assert set(c.get_run(run_id).data.metrics) == {"tar_at_far_0.001", "train_id_accuracy"}
