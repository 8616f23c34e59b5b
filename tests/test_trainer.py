"""The trainer training fits: Ray Train's TorchTrainer minus the detached placement-group cleaner,
and minus the datasets callback (and its idle DatasetManager actor) when it has no datasets.

The cleaner removed a live run's placement group when a State API reply came back empty under
load (CI: "Destroying worker since its placement group was removed"); see reidscale.train.trainer.
No Ray is started here: Ray Train builds its callbacks in the driver, before any actor exists.
"""

from __future__ import annotations

import logging

import pytest
import ray.train
from ray.train.torch import TorchConfig, TorchTrainer
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2._internal.callbacks.placement_group_callback import PlacementGroupCleanerCallback

from reidscale.train.trainer import JobScopedTorchTrainer


def _callback_types(cls, datasets=None) -> list[str]:
    trainer = cls(lambda config: None, scaling_config=ray.train.ScalingConfig(num_workers=2),
                  torch_config=TorchConfig(backend="gloo"), datasets=datasets)
    return [type(cb).__name__ for cb in trainer._create_default_callbacks()]


def test_job_scoped_trainer_keeps_every_stock_callback_but_the_cleaner_and_the_unused_datasets_one():
    stock, ours = _callback_types(TorchTrainer), _callback_types(JobScopedTorchTrainer)
    # the stock trainer still makes both: if Ray drops one, its part of the module can go too
    left_out = {PlacementGroupCleanerCallback.__name__, DatasetsCallback.__name__}
    assert left_out <= set(stock)
    assert ours == [name for name in stock if name not in left_out]
    assert "BackendSetupCallback" in ours  # gloo/NCCL process groups are still set up by Ray


def test_job_scoped_trainer_keeps_the_datasets_callback_when_given_datasets():
    # a callable stands in for a Ray Dataset: Ray Train calls it only when the workers start
    datasets = {"train": lambda: None}
    stock = _callback_types(TorchTrainer, datasets)
    ours = _callback_types(JobScopedTorchTrainer, datasets)
    assert DatasetsCallback.__name__ in ours
    assert ours == [name for name in stock if name != PlacementGroupCleanerCallback.__name__]


def test_training_fits_the_job_scoped_trainer(tmp_path):
    from reidscale.train.config import TrainJobConfig
    from reidscale.train.job import build_trainer
    from reidscale.train.state import WorkerPlan

    cfg = TrainJobConfig()
    cfg.train.storage_path = str(tmp_path)
    plan = WorkerPlan(cfg=cfg, num_classes=10, steps_per_epoch=1, stage1_steps_per_epoch=0, row_groups=[],
                      run_id="r", tracking_uri=f"sqlite:///{tmp_path}/mlflow.db")
    trainer = build_trainer(plan, use_gpu=False)
    assert isinstance(trainer, JobScopedTorchTrainer)
    callbacks = trainer._create_default_callbacks()
    assert not any(isinstance(cb, (PlacementGroupCleanerCallback, DatasetsCallback)) for cb in callbacks)


def _cpus_cfg(workers: int, per_worker: float, per_task: float):
    from reidscale.train.config import TrainJobConfig

    cfg = TrainJobConfig()
    cfg.train.num_workers, cfg.train.cpus_per_worker, cfg.train.data_cpus_per_task = workers, per_worker, per_task
    return cfg


def test_workers_leaving_room_for_one_decode_task_pass():
    from reidscale.train.job import check_decode_cpus

    check_decode_cpus(_cpus_cfg(2, 0.5, 1.0), cluster_cpus=2.0, private=True)  # 1 CPU left: one task
    check_decode_cpus(_cpus_cfg(3, 0.2, 0.4), cluster_cpus=1.0, private=True)  # 0.4 left (1 - 3 x 0.2 < 0.4 in floats)


def test_workers_taking_the_cpus_are_refused_on_a_private_ray_and_warned_about_on_a_cluster(caplog):
    from reidscale.config import ConfigError
    from reidscale.train.job import check_decode_cpus

    cfg = _cpus_cfg(2, 1.0, 1.0)
    with pytest.raises(ConfigError, match=r"train.num_workers=2 x train.cpus_per_worker=1 take 2 of the Ray "
                                          r"cluster's 2 CPUs, leaving 0 .*train.data_cpus_per_task=1"):
        check_decode_cpus(cfg, cluster_cpus=2.0, private=True)
    # a cluster's autoscaler may add CPUs once the tasks wait: said, not refused
    with caplog.at_level(logging.WARNING, logger="reidscale.train.job"):
        check_decode_cpus(cfg, cluster_cpus=2.0, private=False)
    assert any("autoscaler" in r.getMessage() and r.levelno == logging.WARNING for r in caplog.records)
