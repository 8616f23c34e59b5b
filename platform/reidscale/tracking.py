"""MLflow: where runs go, and small helpers that log without global state.

Default store: ``sqlite:///<run_dir>/mlflow.db`` (MLflow 3.x refuses a plain ./mlruns
file store). A team points ``tracking.uri`` at its ``mlflow server``. Everything here
uses an explicit ``MlflowClient`` and run id, never ``mlflow.start_run``'s process-global
active run, so a driver and a Ray worker can log into the same run.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reidscale.config import ConfigError, flatten


@dataclass
class TrackingConfig:
    # empty: sqlite:///<run_dir>/mlflow.db
    uri: str = ""
    experiment: str = "reidscale"

    def validate(self) -> None:
        if self.uri and "://" not in self.uri:
            raise ConfigError(f"uri: {self.uri!r} is not a URI (sqlite:///abs/path.db or http://host:port)")
        if self.uri.startswith("file:") or (self.uri and self.uri.rstrip("/").endswith("mlruns")):
            raise ConfigError("uri: MLflow 3.x refuses a file store; use sqlite:///path.db or a server URI")


def tracking_uri(cfg: TrackingConfig, run_dir: str | Path) -> str:
    if cfg.uri:
        return cfg.uri
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def artifact_location(uri: str) -> str | None:
    """Artifacts beside a SQLite store; without this MLflow writes them to ./mlruns of the CWD."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///"):]).resolve()
        return (db.parent / "mlartifacts").as_uri()
    return None  # a tracking server decides (its --artifacts-destination)


def ui_command(uri: str) -> str:
    if uri.startswith("sqlite:"):
        return f"mlflow ui --backend-store-uri {uri} --host 127.0.0.1 --port 5000"
    return f"open {uri} in a browser"


def client(uri: str):
    import mlflow
    from mlflow.tracking import MlflowClient

    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri)


def start_run(uri: str, experiment: str, run_name: str, params: Any = None, tags: dict | None = None) -> str:
    """Create a run (experiment created on first use) and log ``params``; return its id."""
    c = client(uri)
    exp = c.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else c.create_experiment(experiment, artifact_location=artifact_location(uri))
    run = c.create_run(exp_id, run_name=run_name, tags=tags or {})
    if params is not None:
        log_params(c, run.info.run_id, params)
    return run.info.run_id


def log_params(c, run_id: str, params: Any) -> None:
    from mlflow.entities import Param

    flat = flatten(params)
    items = [Param(k, str(v)[:6000]) for k, v in flat.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run_id, params=items[i : i + 100])


def log_metrics(c, run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    batch = [Metric(metric_name(k), float(v), now, step or 0) for k, v in metrics.items()]
    c.log_batch(run_id, metrics=batch)


def dataset_metrics(manifest: dict) -> dict[str, float]:
    """What a training run should show about its data: per-split images/identities and the
    images ``prepare_data`` skipped as unreadable (so a silently shrunken set is visible)."""
    out: dict[str, float] = {}
    for split, info in manifest.get("splits", {}).items():
        out[f"data_{split}_images"] = info["images"]
        out[f"data_{split}_identities"] = info["identities"]
    skipped = manifest.get("skipped") or {}
    out["data_skipped_images"] = skipped.get("images", 0)
    out["data_skipped_rate"] = skipped.get("error_rate", 0.0)
    return out


def metric_name(key: str) -> str:
    """MLflow allows letters, digits and _-. /; `tar@far=0.001` becomes `tar_at_far_0.001`."""
    return key.replace("@", "_at_").replace("=", "_")


def log_json_artifact(c, run_id: str, obj: dict, name: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str))
        c.log_artifact(run_id, str(path))


def run_url(uri: str, run_id: str, experiment_id: str | None = None) -> str:
    if uri.startswith("http"):
        return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
    return f"run {run_id} in {uri}"


def run_exists(c, run_id: str) -> bool:
    from mlflow.exceptions import MlflowException

    try:
        c.get_run(run_id)
        return True
    except MlflowException:
        return False


def reopen_run(c, run_id: str, params: Any) -> None:
    """Mark a resumed run RUNNING again and record what changed.

    MLflow params are immutable, so a value that differs from the one logged at the start
    (``train.epochs`` when a run is trained further) becomes a ``reidscale.resume.<key>`` tag
    ("old -> new"); keys the run did not have yet are logged as params.
    """
    from mlflow.entities import Param, RunTag

    run = c.get_run(run_id)
    before = run.data.params
    new, changed = [], []
    for key, value in flatten(params).items():
        value = str(value)[:6000]
        if key not in before:
            new.append(Param(key, value))
        elif before[key] != value:
            changed.append(RunTag(f"reidscale.resume.{key}", f"{before[key]} -> {value}"))
    resumes = int(run.data.tags.get("reidscale.resumes", "0")) + 1
    c.log_batch(run_id, params=new, tags=changed + [RunTag("reidscale.resumes", str(resumes))])
    c.update_run(run_id, status="RUNNING")
