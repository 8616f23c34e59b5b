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
