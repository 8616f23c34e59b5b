"""The Ray layer of training: check inputs, start the MLflow run, build and fit a TorchTrainer."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, replace
from pathlib import Path

from reidscale import tracking
from reidscale.config import dump_yaml
from reidscale.data import shards
from reidscale.ray_runtime import cluster_has_gpus, init_ray
from reidscale.train.config import TrainJobConfig


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
    import numpy as np

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


def run_training(cfg: TrainJobConfig) -> dict:
    """Train, checkpoint and export; returns a summary dict (also written as JSON)."""
    import ray.train
    from ray.train.torch import TorchConfig, TorchTrainer

    from reidscale.data.pipeline import row_groups

    cfg = resolve_paths(cfg)
    run_dir = Path(cfg.run_dir)
    # refuse bad shards before any worker starts
    shards.verify_split(cfg.data_dir, "train")
    manifest = shards.read_manifest(cfg.data_dir)
    num_classes = manifest["num_classes"]
    if num_classes < cfg.train.p:
        raise ValueError(f"train.p={cfg.train.p} exceeds the {num_classes} training identities in {cfg.data_dir}")

    run_dir.mkdir(parents=True, exist_ok=True)
    dump_yaml(cfg, run_dir / "train_config.yaml")
    uri = tracking.tracking_uri(cfg.tracking, run_dir)
    run_id = tracking.start_run(uri, cfg.tracking.experiment, cfg.run_name, params=cfg,
                                tags={"reidscale.job": "train", "reidscale.data_dir": cfg.data_dir})
    c = tracking.client(uri)
    c.log_artifact(run_id, str(run_dir / "train_config.yaml"))
    c.log_artifact(run_id, str(Path(cfg.data_dir) / "manifest.json"))
    tracking.log_metrics(c, run_id, tracking.dataset_metrics(manifest), step=0)
    print(f"MLflow run: {tracking.run_url(uri, run_id)}", flush=True)
    print(f"  view it with: {tracking.ui_command(uri)}", flush=True)

    init_ray()
    use_gpu = cfg.train.use_gpu == "true" or (cfg.train.use_gpu == "auto" and cluster_has_gpus())
    steps_per_epoch = estimate_steps_per_epoch(cfg.data_dir, cfg.train.p, cfg.train.k, cfg.train.num_workers)
    groups = row_groups(cfg.data_dir, "train")
    if len(groups) < cfg.train.num_workers:
        raise ValueError(f"{cfg.data_dir}: the train split has {len(groups)} row groups for {cfg.train.num_workers} "
                         "workers; write smaller row groups (prepare_data rows_per_group=...) or use fewer workers")
    resume = None
    if cfg.train.resume_from:
        from reidscale.train.checkpoint import verify_complete

        state = verify_complete(cfg.train.resume_from)  # refuse before any worker starts
        print(f"resuming from {cfg.train.resume_from} at epoch {state['epoch'] + 1}, step {state['step_in_epoch']}",
              flush=True)
        resume = ray.train.Checkpoint(cfg.train.resume_from)
    resources = {"CPU": cfg.train.cpus_per_worker}
    if use_gpu:
        resources["GPU"] = 1
    trainer = TorchTrainer(
        _loop_entry,
        train_loop_config={
            "cfg": asdict(cfg),
            "num_classes": num_classes,
            "steps_per_epoch": steps_per_epoch,
            "row_groups": groups,
            "stage1_steps_per_epoch": math.ceil(sum(g[2] for g in groups) / (cfg.train.num_workers * cfg.clipreid.stage1_batch)),
            "run_id": run_id,
            "tracking_uri": uri,
        },
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers, use_gpu=use_gpu, resources_per_worker=resources
        ),
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=ray.train.RunConfig(
            name=f"{cfg.run_name}",
            storage_path=cfg.train.storage_path,
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            worker_runtime_env=omp_env(cfg.train.cpus_per_worker),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=2),
        ),
        resume_from_checkpoint=resume,
    )
    t0 = time.time()
    result = trainer.fit()
    wall = time.time() - t0
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
    }
    tracking.log_metrics(c, run_id, {"train_wall_time_s": wall}, step=metrics.get("global_step", 0))
    tracking.log_json_artifact(c, run_id, summary, "train_summary.json")
    shards.atomic_write_json(run_dir / "train_summary.json", summary)
    c.set_terminated(run_id)
    return summary


def _loop_entry(loop_config: dict) -> None:
    # imported lazily so the driver does not need DeepSpeed loaded
    from reidscale.train.loop import train_loop_per_worker

    train_loop_per_worker(loop_config)
