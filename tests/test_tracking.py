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
