"""The Ray layer of training: check inputs, start the MLflow run, build and fit a TorchTrainer."""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from reidscale import atomic, tracking
from reidscale.config import ConfigError, dump_yaml
from reidscale.data import preflight, shards
from reidscale.data.pipeline import RowGroup, row_groups
from reidscale.models import exported
from reidscale.ray_runtime import init_ray, joined_cluster, ray_cluster_cpus, resolve_use_gpu, train_logging_config
from reidscale.train.config import TrainJobConfig
from reidscale.train.recovery import ResumePoint, describe, find_resume_point
from reidscale.train.state import WorkerPlan

log = logging.getLogger(__name__)


def resolve_paths(cfg: TrainJobConfig) -> TrainJobConfig:
    """Absolute paths: Ray workers do not share the driver's working directory."""
    run_dir = Path(cfg.run_dir).expanduser().resolve()
    data_dir = Path(cfg.data_dir).expanduser().resolve() if cfg.data_dir else run_dir / "data"
    storage = cfg.train.storage_path or str(run_dir / "ray_results")
    if "://" not in storage:
        storage = str(Path(storage).expanduser().resolve())
    return replace(cfg, run_dir=str(run_dir), data_dir=str(data_dir), train=replace(cfg.train, storage_path=storage))


def estimate_steps_per_epoch(data_dir: str, p: int, k: int, num_workers: int) -> int:
    """Steps the P×K batcher takes per epoch: each identity fills ceil(n/K) K-slots."""
    identities = shards.read_metadata(data_dir, "train").column("identity").to_numpy()
    _, counts = np.unique(identities, return_counts=True)
    rows = int((np.ceil(counts / k) * k).sum())
    return max(1, math.ceil(rows / (num_workers * p * k)))


def omp_env(threads: float) -> dict:
    """Worker runtime env pinning OpenMP's team size to the worker's CPUs.

    Ray Train runs the training function in a side thread; torch.set_num_threads there does
    not size OpenMP's team the way the environment does, and a 2-thread worker measured 25-30%
    slower than the same loop in a main thread until OMP_NUM_THREADS was set (bench/train_throughput.py).
    """
    n = str(max(1, int(threads)))
    return {"env_vars": {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n}}


@dataclass
class TrainInputs:
    """What the driver checked before starting anything: the data and where training starts."""

    manifest: dict
    num_classes: int
    row_groups: list[RowGroup]
    steps_per_epoch: int
    resume: ResumePoint


def check_inputs(cfg: TrainJobConfig) -> TrainInputs:
    """Every check that can fail before Ray or MLflow start (cfg has absolute paths)."""
    # refuse bad shards before any worker starts
    shards.verify_split(cfg.data_dir, "train")
    manifest = shards.read_manifest(cfg.data_dir)
    num_classes = manifest["num_classes"]
    stored = manifest.get("stored_size")
    if stored and (stored["height"], stored["width"]) != (cfg.transform.height, cfg.transform.width):
        log.warning(f"{cfg.data_dir}: crops were stored at {stored['height']}x{stored['width']} (prepare's "
                    f"store_height/store_width) but transform is {cfg.transform.height}x{cfg.transform.width}: "
                    "every epoch resizes them again; prepare at the training size")
    preflight.check_row_groups(cfg.data_dir, "train", cfg.train.num_workers)
    for warning in preflight.check_pk(cfg.data_dir, cfg.train.p, cfg.train.k, cfg.train.num_workers):
        log.warning("%s", warning)
    groups = row_groups(cfg.data_dir, "train")
    if cfg.train.eval_every_epochs:
        for split in ("query", "gallery"):
            shards.verify_split(cfg.data_dir, split)  # validation must not score a damaged split
    point = find_resume_point(str(Path(cfg.train.storage_path) / cfg.run_name) if "://" not in cfg.train.storage_path
                              else f"{cfg.train.storage_path.rstrip('/')}/{cfg.run_name}",
                              cfg.train.resume_from, epochs=cfg.train.epochs, run_name=cfg.run_name)
    steps = estimate_steps_per_epoch(cfg.data_dir, cfg.train.p, cfg.train.k, cfg.train.num_workers)
    return TrainInputs(manifest, num_classes, groups, steps, point)


def check_decode_cpus(cfg: TrainJobConfig, cluster_cpus: float, private: bool) -> None:
    """Refuse (a private Ray) or warn about (a cluster, which an autoscaler may grow) training
    workers that take so many of the cluster's CPUs that no decode task fits beside them.

    Why: the workers hold their CPUs for the whole run and wait for batches from decode tasks
    (``data.pipeline.worker_stream``), each asking for ``train.data_cpus_per_task`` CPUs; with
    none left, no task is ever scheduled and the run waits forever without a word (2 workers ×
    1 CPU on a 2-CPU machine did). The configs' ``cpus_per_worker`` is the knob."""
    t = cfg.train
    taken = t.num_workers * t.cpus_per_worker
    left = cluster_cpus - taken
    if left >= t.data_cpus_per_task - 1e-9:
        return
    message = (f"train.num_workers={t.num_workers} x train.cpus_per_worker={t.cpus_per_worker:g} take {taken:g} of "
               f"the Ray cluster's {cluster_cpus:g} CPUs, leaving {max(left, 0.0):g} for decode tasks of "
               f"train.data_cpus_per_task={t.data_cpus_per_task:g}: the workers would wait for batches forever; "
               f"lower train.cpus_per_worker or train.data_cpus_per_task")
    if private:
        raise ConfigError(message)
    log.warning(message + " (or let the cluster's autoscaler add CPUs: the run waits until it does)")


def open_mlflow_run(cfg: TrainJobConfig, inputs: TrainInputs) -> tuple[object, str, str]:
    """(client, run id, tracking uri): the run a resumed training keeps logging into, else a new one."""
    run_dir = Path(cfg.run_dir)
    uri = tracking.tracking_uri(cfg.tracking, run_dir)
    c = tracking.client(uri)
    point = inputs.resume
    previous = point.state.mlflow_run_id if point.state is not None and point.how != "resume_from" else ""
    if previous and tracking.run_exists(c, previous):
        run_id = previous
        tracking.reopen_run(c, run_id, cfg)
    else:
        tags = {"reidscale.job": "train", "reidscale.data_dir": cfg.data_dir}
        if point.how == "resume_from":
            tags["reidscale.resumed_from"] = point.path
            if point.state is not None and point.state.mlflow_run_id:
                tags["reidscale.resumed_from_run_id"] = point.state.mlflow_run_id
        run_id = tracking.start_run(uri, cfg.tracking.experiment, f"train-{cfg.run_name}", params=cfg, tags=tags)
        c.log_artifact(run_id, str(run_dir / "train_config.yaml"))
        c.log_artifact(run_id, str(Path(cfg.data_dir) / "manifest.json"))
        tracking.log_metrics(c, run_id, tracking.dataset_metrics(inputs.manifest), step=0)
        splits = ("train", "query", "gallery") if cfg.train.eval_every_epochs else ("train",)
        tracking.log_dataset(c, run_id, cfg.data_dir, inputs.manifest, splits, "training")
    return c, run_id, uri


def run_training(cfg: TrainJobConfig) -> dict:
    """Train, checkpoint and export; returns a summary dict (also written as JSON)."""
    cfg = resolve_paths(cfg)
    run_dir = Path(cfg.run_dir)
    inputs = check_inputs(cfg)
    note = describe(inputs.resume)
    if note:
        log.info(note)
    # Ray before the MLflow run: a cluster too small for the workers and their decode tasks is
    # refused before a run is recorded
    init_ray(job_name=f"train-{cfg.run_name}")
    check_decode_cpus(cfg, ray_cluster_cpus(), private=not joined_cluster())
    run_dir.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, run_dir / "train_config.yaml")
    c, run_id, uri = open_mlflow_run(cfg, inputs)
    log.info(f"MLflow run: {tracking.run_url(uri, run_id)}")
    log.info(f"  view it with: {tracking.ui_command(uri)}")
    try:
        use_gpu = resolve_use_gpu(cfg.train.use_gpu)
        plan = WorkerPlan(
            cfg=cfg, num_classes=inputs.num_classes, steps_per_epoch=inputs.steps_per_epoch,
            stage1_steps_per_epoch=math.ceil(sum(g.rows for g in inputs.row_groups)
                                             / (cfg.train.num_workers * cfg.clipreid.stage1_batch)),
            row_groups=inputs.row_groups, run_id=run_id, tracking_uri=uri,
            resume_path=inputs.resume.path, stale_checkpoints=inputs.resume.existing,
        )
        t0 = time.time()
        monitor = tracking.system_metrics(run_id, uri) if cfg.tracking.system_metrics else None
        try:
            result = build_trainer(plan, use_gpu).fit()
        finally:
            if monitor is not None:
                monitor.finish()
        wall = time.time() - t0
        logged = log_models(cfg, run_id, uri, inputs)
    except BaseException as exc:
        c.set_terminated(run_id, "KILLED" if isinstance(exc, KeyboardInterrupt) else "FAILED")
        if type(exc).__name__ == "TrainingFailedError":
            raise TrainingError(f"training failed in a worker: {_last_line(exc)} (MLflow run {run_id} marked "
                                f"FAILED; the job log above has the worker's traceback)") from None
        raise
    metrics = dict(result.metrics or {})
    summary = {
        "run_id": run_id,
        "tracking_uri": uri,
        "wall_time_s": wall,
        "trained_model": str(run_dir / "models" / "trained"),
        "untrained_model": str(run_dir / "models" / "untrained"),
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "final": metrics,
        "use_gpu": use_gpu,
        "num_workers": cfg.train.num_workers,
        "started_from": inputs.resume.how,
        "logged_models": logged,
    }
    tracking.log_metrics(c, run_id, {"train_wall_time_s": wall}, step=metrics.get("global_step", 0))
    tracking.log_json_artifact(c, run_id, summary, "train_summary.json")
    atomic.write_json(run_dir / "train_summary.json", summary)
    c.set_terminated(run_id)
    return summary


def log_models(cfg: TrainJobConfig, run_id: str, uri: str, inputs: TrainInputs) -> dict:
    """models/trained (as ``model-last``) and models/best (``model-best``) as MLflow pyfunc models;
    with ``tracking.register_as`` the best one (the last without validation) becomes a new version."""
    models = Path(cfg.run_dir) / "models"
    best = models / "best"
    registered = best if best.is_dir() else models / "trained"
    out = {}
    for name, directory in (("model-last", models / "trained"), ("model-best", best)):
        if not directory.is_dir():
            continue
        weights = exported.model_sha(directory)
        tags = {"weights_sha256": weights, "data_manifest_sha256": atomic.sha256_file(Path(cfg.data_dir) / "manifest.json"),
                "recipe": cfg.recipe, "reidscale.train_run_id": run_id}
        register = cfg.tracking.register_as if directory == registered else ""
        out[name] = tracking.log_embedding_model(uri, run_id, directory, name, register_as=register, tags=tags)
        log.info(f"MLflow model {name}: {out[name]['model_uri']}"
                 + (f" registered as {register} version {out[name]['version']}" if register else ""))
    return out


class TrainingError(RuntimeError):
    """Training stopped in a worker; the message is one line."""


def _last_line(exc: BaseException) -> str:
    """The innermost error's own line out of Ray's multi-line TrainingFailedError."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.split(":", 1)[0].endswith(("Error", "Exception"))]
    return (errors or lines or [type(exc).__name__])[-1][:400]


def build_trainer(plan: WorkerPlan, use_gpu: bool):
    import ray.train
    from ray.train.torch import TorchConfig

    from reidscale.train.trainer import JobScopedTorchTrainer

    cfg = plan.cfg
    resources = {"CPU": cfg.train.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    return JobScopedTorchTrainer(
        _loop_entry,
        train_loop_config={"plan": plan},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=cfg.run_name,
            storage_path=cfg.train.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            worker_runtime_env=omp_env(cfg.train.cpus_per_worker),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
            # Ray Train's own INFO lines (worker-group start, per-report chatter) at WARNING
            # unless REIDSCALE_RAY_VERBOSE; it filters only ray.train records, not our progress lines
            logging_config=train_logging_config(),
        ),
    )


def _loop_entry(loop_config: dict) -> None:
    # imported lazily so the driver does not need DeepSpeed loaded
    from reidscale.train.loop import train_loop_per_worker

    train_loop_per_worker(loop_config)
