"""MLflow: where runs go, and small helpers that log without global state.

Default store: ``sqlite:///<run_dir>/mlflow.db`` (MLflow 3.x refuses a plain ./mlruns
file store). A team points ``tracking.uri`` at its ``mlflow server``. Everything here
uses an explicit ``MlflowClient`` and run id, never ``mlflow.start_run``'s process-global
active run, so a driver and a Ray worker can log into the same run.
"""

from __future__ import annotations

import json
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reidscale.config import ConfigError, flatten

log = logging.getLogger(__name__)


@dataclass
class TrackingConfig:
    # empty: sqlite:///<run_dir>/mlflow.db
    uri: str = ""
    experiment: str = "reidscale"
    # register the trained embedding model (models/best when validation ran, else models/trained)
    # as a new version of this registered model; empty: log it to the run only
    register_as: str = ""
    # CPU/memory/disk (GPU with pynvml) of the driver's machine, every 10 s, in the training run
    system_metrics: bool = True

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
    run = c.create_run(ensure_experiment(c, experiment, uri), run_name=run_name, tags=tags or {})
    if params is not None:
        log_params(c, run.info.run_id, params)
    return run.info.run_id


def lineage_tags(c, model_config: dict) -> dict[str, str]:
    """Tags that tie a run to the model it used: ``reidscale.model_sha256``, the training run
    (``reidscale.train_run_id``, when that run is in this store) and the registered versions
    of those weights (``reidscale.model_versions`` = "NAME/VERSION,...")."""
    sha = model_config.get("weights_sha256", "")
    tags = {"reidscale.model_sha256": sha}
    train_run = model_config.get("mlflow_run_id", "")
    if train_run and run_exists(c, train_run):
        tags["reidscale.train_run_id"] = train_run
    if sha:
        try:
            versions = c.search_model_versions(f"tags.weights_sha256 = '{sha}'")
        except Exception as exc:  # an older store without tag search: the sha256 tag still links them
            log.debug("model version search failed: %s", exc)
            versions = []
        if versions:
            tags["reidscale.model_versions"] = ",".join(sorted(f"{v.name}/{v.version}" for v in versions))
    return tags


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


# MLflow 3's UI opens an experiment in the view its kind names; without the tag it guesses GenAI.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"


def ensure_experiment(c, name: str, uri: str) -> str:
    """The experiment's id (created on first use), tagged as a model-training experiment."""
    exp = c.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else c.create_experiment(name, artifact_location=artifact_location(uri))
    if exp is None or exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
        c.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
    return exp_id


def log_dataset(c, run_id: str, data_dir: str | Path, manifest: dict, splits: tuple[str, ...], context: str) -> None:
    """A run input for the Parquet dataset: source = its manifest (path + sha256), profile = counts.

    One input per split, so the UI's Datasets column says what a run trained or was scored on.
    """
    from mlflow.entities import Dataset, DatasetInput, InputTag

    from reidscale.atomic import sha256_file

    manifest_path = (Path(data_dir) / "manifest.json").resolve()
    sha = sha256_file(manifest_path)
    inputs = []
    for split in splits:
        info = manifest.get("splits", {}).get(split, {})
        profile = {"images": info.get("images"), "identities": info.get("identities"),
                   "cameras": info.get("cameras"), "shards": len(info.get("shards", []) or [])}
        source = {"uri": str(manifest_path), "sha256": sha, "split": split}
        dataset = Dataset(name=f"{Path(data_dir).resolve().name}/{split}", digest=sha[:16], source_type="local",
                          source=json.dumps(source), profile=json.dumps(profile))
        inputs.append(DatasetInput(dataset, tags=[InputTag("mlflow.data.context", context if split == "train"
                                                           else f"{context}-{split}")]))
    c.log_inputs(run_id, datasets=inputs)


def system_metrics(run_id: str, uri: str, interval_s: float = 10.0):
    """A started MLflow system-metrics monitor (CPU, memory, disk, network; GPU with pynvml) or None."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=interval_s, tracking_uri=uri)
        monitor.start()
        return monitor
    except Exception as exc:  # psutil missing or an unsupported platform: training goes on without
        log.warning("MLflow system metrics off: %s", exc)
        return None


def log_embedding_model(uri: str, run_id: str, model_dir: str | Path, name: str, *, register_as: str = "",
                        tags: dict | None = None) -> dict:
    """Log an exported embedding model as an MLflow pyfunc (signature + input example); optionally
    register it as a new version of ``register_as`` with ``tags``. Returns {model_uri, version}."""
    import io

    import mlflow
    import numpy as np
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, Schema, TensorSpec
    from PIL import Image

    from reidscale.models.exported import read_export_config

    model_dir = Path(model_dir)
    config = read_export_config(model_dir)
    sie = int(config.get("model", {}).get("sie_cameras", 0) or 0) > 0
    signature = ModelSignature(
        inputs=Schema([ColSpec("binary", "image"), ColSpec("long", "camera", required=sie)]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, int(config["dim"])))]),
    )
    t = config["transform"]
    buf = io.BytesIO()
    Image.fromarray(np.full((t["height"], t["width"], 3), 127, np.uint8)).save(buf, format="PNG")
    import pandas as pd

    example = pd.DataFrame({"image": [buf.getvalue()], "camera": [0]})
    package = Path(__file__).resolve().parent
    str_tags = {k: str(v) for k, v in (tags or {}).items()}
    c = client(uri)
    run = c.get_run(run_id)
    # the logged model is created here, in the run's experiment: without an active run
    # (never started here, see the module docstring) MLflow would file it under the default one
    logged = c.create_logged_model(run.info.experiment_id, name=name, source_run_id=run_id, tags=str_tags,
                                   params=run.data.params)
    info = mlflow.models.Model.log(
        artifact_path=None, flavor=mlflow.pyfunc, run_id=run_id, model_id=logged.model_id, name=name,
        python_model=str(package / "models" / "mlflow_pyfunc.py"), artifacts={"embedding_model": str(model_dir)},
        # the model's code imports reidscale: ship the package it was logged with, so loading
        # works without reidscale installed and runs the code that matches these weights
        code_paths=[str(package)], pip_requirements=pyfunc_requirements(),
        signature=signature, input_example=example, registered_model_name=register_as or None, tags=str_tags,
    )
    version = getattr(info, "registered_model_version", None)
    if register_as and version is not None:
        for key, value in str_tags.items():
            c.set_model_version_tag(register_as, str(version), key, value)
        # the same "NAME/VERSION,..." tag lineage_tags puts on evaluate/build_index runs
        links = run.data.tags.get("reidscale.model_versions", "").split(",")
        c.set_tag(run_id, "reidscale.model_versions",
                  ",".join(sorted({v for v in links if v} | {f"{register_as}/{version}"})))
    return {"model_uri": info.model_uri, "version": version}


# what loading the pyfunc imports (reidscale.embed -> models/reid: torch, open_clip, transformers
# backbones; pyarrow/yaml at import); mlflow itself MLflow adds on its own
PYFUNC_PACKAGES = ("torch", "torchvision", "open-clip-torch", "timm", "transformers", "safetensors", "numpy",
                   "pillow", "pyarrow", "pyyaml")


def pyfunc_requirements() -> list[str]:
    """``PYFUNC_PACKAGES`` pinned to the versions this model was logged with (public part: a
    ``+cpu`` local build tag is not on PyPI)."""
    from importlib.metadata import version

    from packaging.version import Version

    return [f"{name}=={Version(version(name)).public}" for name in PYFUNC_PACKAGES]
