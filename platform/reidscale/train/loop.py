"""The per-worker training loop: set up, restore, epochs of P×K steps, end of epoch, finish.

Runs inside a Ray Train worker (``train_loop_per_worker``). The same code runs on CPU
(gloo, fp32) and GPU (NCCL, bf16): the only device-specific choices are the device,
the process-group backend (made by the trainer) and the precision. What a recipe adds
(model, stage 1, loss terms) comes from ``recipes.py``; DeepSpeed mechanics from ``engine.py``.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import ray.train
import ray.train.torch
import torch

from reidscale import atomic, tracking
from reidscale.data.pipeline import EpochBlocks, PKStream, worker_epochs
from reidscale.models.inference import model_input
from reidscale.models.reid import export_embedding_model, side_inputs
from reidscale.models.sharded_fc_checkpoint import load_sharded_fc, save_sharded_fc
from reidscale.train import engine as eng
from reidscale.train.checkpoint import verify_complete, write_rank_listing, write_state
from reidscale.train.config import TrainJobConfig
from reidscale.train.recipes import Batch, BaselineRecipe, recipe_for, weigh
from reidscale.train.state import EpochStats, TrainState, WorkerPlan
from reidscale.train.validation import validate

CHECKPOINT_TAG = "state"
SHARDED_FC_DIR = "sharded_fc"  # the sharded ID head's rows and optimizer state, one logical table
# Ray Train routes worker logging to the job log once; a plain print() is teed twice when a
# library has wrapped sys.stdout.
log = logging.getLogger("reidscale.train")


@dataclass
class Worker:
    """One training worker's fixed context, built by ``set_up``."""

    plan: WorkerPlan
    cfg: TrainJobConfig
    rank: int
    world: int
    device: torch.device
    precision: str
    dtype: torch.dtype
    run_dir: Path
    recipe: BaselineRecipe
    model: torch.nn.Module
    checkpoint: object | None  # the ray.train.Checkpoint to restore, if any
    engine: object = None
    optimizer: object = None
    sharded: eng.ShardedHead | None = None  # model.shard_classifier: this worker's identity range
    stream: PKStream | None = None
    mlflow: object = None  # rank 0 only
    logged_up_to: int = 0  # MLflow steps already logged by an earlier attempt
    epochs_logged_up_to: int = 0
    trace: object = None
    start_time: float = 0.0
    start_step: int = 0


def _checkpoint_to_load(plan: WorkerPlan):
    """The checkpoint this attempt continues from.

    Ray Train offers the newest checkpoint it registered; when that one already existed when
    the driver started, the driver's verified choice (``plan.resume_path``, possibly an older
    complete one, or a user's ``train.resume_from``) wins. A checkpoint this run wrote itself
    before a worker died is newer than all of them and is used as offered.
    """
    offered = ray.train.get_checkpoint()
    if offered is not None and Path(offered.path).name not in plan.stale_checkpoints:
        return offered
    return ray.train.Checkpoint(plan.resume_path) if plan.resume_path else None


def set_up(plan: WorkerPlan) -> tuple[Worker, TrainState]:
    """Context, model (and the untrained export), recipe's stage 1, engine."""
    cfg = plan.cfg
    ctx = ray.train.get_context()
    device = ray.train.torch.get_device()
    precision = eng.resolve_precision(cfg.train.precision, device)
    torch.manual_seed(cfg.train.seed)  # same init on every rank
    recipe = recipe_for(cfg)
    w = Worker(plan=plan, cfg=cfg, rank=ctx.get_world_rank(), world=ctx.get_world_size(), device=device,
               precision=precision, dtype=eng.compute_dtype(precision), run_dir=Path(cfg.run_dir), recipe=recipe,
               model=recipe.build_model(plan.num_classes), checkpoint=_checkpoint_to_load(plan))
    if w.rank == 0 and w.checkpoint is None:
        # the untrained reference: the very weights training starts from
        export_embedding_model(w.model.embedding, cfg.model, cfg.transform, w.run_dir / "models" / "untrained",
                               extra={"mlflow_run_id": plan.run_id, "trained_steps": 0})
    recipe.before_training(w)
    state = TrainState(world_size=w.world, steps_per_epoch=plan.steps_per_epoch, mlflow_run_id=plan.run_id,
                       epochs=cfg.train.epochs)
    w.optimizer = eng.make_optimizer(w.model, cfg)
    schedule = eng.stage2_schedule(cfg, lambda: state.steps_per_epoch)
    w.engine = eng.build_engine(w.model, w.optimizer, schedule, eng.deepspeed_config(cfg, precision), device)
    if cfg.model.shard_classifier:
        w.sharded = eng.build_sharded_head(cfg, w.model.embedding.dim, plan.num_classes, schedule, device)
        recipe.head = w.sharded.head
        if w.rank == 0:
            log.info(f"sharded ID head: {w.sharded.head.extra_repr()} (each of {w.world} workers holds "
                     f"{w.sharded.head.num_local} of {plan.num_classes} identities)")
    w.stream = PKStream(cfg.train.p, cfg.train.k, seed=cfg.train.seed * 1_000_003 + w.rank,
                        window_identities=cfg.train.window_identities or None, mode=cfg.train.sampler)
    return w, state


def restore(w: Worker, state: TrainState) -> None:
    """Load the checkpoint (if any) into the engine and ``state``; note what MLflow already has."""
    if w.checkpoint is not None:
        with w.checkpoint.as_directory() as ckpt_dir:
            restored = TrainState.from_json(verify_complete(ckpt_dir))
            if restored.world_size != w.world:
                raise RuntimeError(f"checkpoint {w.checkpoint.path} was written by {restored.world_size} workers, "
                                   f"this run has {w.world}; the sampler streams would differ")
            w.engine.load_checkpoint(ckpt_dir, tag=CHECKPOINT_TAG)
            if w.sharded is not None:
                index = load_sharded_fc(w.sharded.head, w.sharded.optimizer, Path(ckpt_dir) / SHARDED_FC_DIR)
                if w.rank == 0:
                    log.info(f"sharded ID head restored: {index['num_classes']} identities from "
                             f"{len(index['shards'])} shard file(s) (sha256 checked) with {index['optimizer']} state")
        for name in ("epoch", "step_in_epoch", "global_step", "steps_per_epoch", "best_mAP", "decode_errors",
                     "validation_seconds"):
            setattr(state, name, getattr(restored, name))
        if w.sharded is not None:
            # the head's schedule is a function of the optimizer steps taken, as the engine's
            # (step() from one before sets both the counter and the group's lr)
            w.sharded.scheduler.last_epoch = w.engine.lr_scheduler.last_epoch - 1
            w.sharded.scheduler.step()
        if w.rank == 0:
            log.info(f"resumed from {w.checkpoint.path}: epoch {state.epoch + 1}, step {state.step_in_epoch} "
                     f"of it, global step {state.global_step}")
    if w.rank == 0:
        w.mlflow = tracking.client(w.plan.tracking_uri)
        w.logged_up_to = _logged_up_to(w.mlflow, w.plan.run_id, "loss")
        w.epochs_logged_up_to = _logged_up_to(w.mlflow, w.plan.run_id, "epoch")
    t = w.cfg.train
    w.trace = open(f"{t.trace_file}.rank{w.rank}", "a") if t.trace_file else None
    w.start_time, w.start_step = time.time(), state.global_step


def _logged_up_to(mlflow, run_id: str, key: str) -> int:
    """Highest step already in MLflow: after a restart those steps are not logged again."""
    history = mlflow.get_metric_history(run_id, key)
    return max((m.step for m in history), default=0)


def _epoch_centres(w: Worker, epoch: int):
    """L2-normalised class centres (the classifier's rows) as they stand at the start of ``epoch``.

    Written once per epoch by rank 0 and memory-mapped by every rank, so a run resumed in the
    middle of an epoch groups identities with the same centres the interrupted run used.
    """
    path = w.run_dir / "sampler" / f"centres-epoch{epoch:04d}.npy"
    # rank 0 decides, so that every rank enters (or skips) the ZeRO-3 gather together
    if eng.broadcast_flag(not path.exists(), w.engine.device):
        import deepspeed

        weight = w.engine.module.classifier.weight
        gather = (deepspeed.zero.GatheredParameters([weight], modifier_rank=None)
                  if w.cfg.train.zero_stage == 3 else None)
        with gather if gather is not None else torch.no_grad():
            centres = torch.nn.functional.normalize(weight.detach().float(), dim=1).cpu().numpy().astype(np.float16)
        if w.rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            np.save(buf, centres)
            atomic.write_bytes(path, buf.getvalue())
    eng.barrier()
    return np.load(path, mmap_mode="r")


def save_checkpoint(w: Worker, state: TrainState, metrics: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        w.engine.save_checkpoint(tmp, tag=CHECKPOINT_TAG)
        if w.sharded is not None:
            # every rank writes its rows, rank 0 the index; Ray merges the ranks' directories
            save_sharded_fc(w.sharded.head, w.sharded.optimizer, Path(tmp) / SHARDED_FC_DIR)
        w.recipe.save_to_checkpoint(Path(tmp), w.rank)
        write_rank_listing(tmp, w.rank)
        if w.rank == 0:
            write_state(tmp, state.to_json())
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))


def _validations_left(t, epoch: int) -> int:
    """Validation passes still to run from the end of ``epoch`` (0-based) on."""
    if not t.eval_every_epochs:
        return 0
    return sum(1 for e in range(epoch, t.epochs) if (e + 1) % t.eval_every_epochs == 0 or e + 1 == t.epochs)


def progress_line(w: Worker, state: TrainState, epoch: int, step_in_epoch: int, loss: float, terms: dict,
                  rate: float) -> str:
    """``epoch e/E step s/S ...`` where S is this run's total as best known now: the current epoch
    counts at least the steps it has taken (a P×K epoch's length varies by a few steps), later
    epochs at the measured length; the ETA adds the validation passes still to come."""
    t = w.cfg.train
    step = state.global_step
    remaining_epochs = t.epochs - epoch - 1
    total = step - step_in_epoch + max(state.steps_per_epoch, step_in_epoch) + state.steps_per_epoch * remaining_epochs
    per_step = (time.time() - w.start_time) / max(step - w.start_step, 1)
    eta = (total - step) * per_step
    validations = _validations_left(t, epoch)
    eta_text = f"eta {(eta + validations * state.validation_seconds) / 60:.1f} min"
    if validations and not state.validation_seconds:
        eta_text += f" + {validations} validation pass{'es' if validations > 1 else ''}"
    lr = w.optimizer.param_groups[0]["lr"]
    return (f"epoch {epoch + 1}/{t.epochs} step {step}/{total} loss {loss:.4f} "
            + " ".join(f"{k} {v:.4f}" for k, v in terms.items())
            + f" lr {lr:.2e} {rate:.1f} img/s/worker {eta_text}")


def step_metrics(loss: float, lr: float, rate: float, terms: dict, id_accuracy: float) -> dict:
    """MLflow names of the per-step figures: ``loss`` (the weighted total), ``train_loss_<term>``
    for each unweighted term, ``train_id_accuracy``, ``lr``, ``images_per_s_per_worker``."""
    return {"loss": loss, "lr": lr, "images_per_s_per_worker": rate, "train_id_accuracy": id_accuracy,
            **{f"train_loss_{k}": v for k, v in terms.items()}}


def epoch_metrics(metrics: dict) -> dict:
    """MLflow names of the end-of-epoch figures: ``epoch``, ``epoch_loss``, ``epoch_steps``,
    ``decode_errors``, ``epoch_images_per_s_per_worker``, ``val_rank1``/``val_mAP``/``val_mINP``."""
    renamed = {"images_per_s_per_worker": "epoch_images_per_s_per_worker"}
    return {renamed.get(k, k): v for k, v in metrics.items() if k != "global_step"}


def epoch_blocks(w: Worker, first_epoch: int) -> EpochBlocks:
    """This worker's decoded blocks from ``first_epoch`` to the last."""
    t = w.cfg.train
    return worker_epochs(w.plan.row_groups, w.cfg.transform, epochs=range(first_epoch, t.epochs), seed=t.seed,
                         rank=w.rank, world=w.world, cpus_per_task=t.data_cpus_per_task,
                         rows_per_task=t.data_rows_per_task)


def run_epoch(w: Worker, state: TrainState, epoch: int, blocks: EpochBlocks) -> EpochStats:
    """One epoch of lockstep P×K steps, continuing mid-epoch after a restore."""
    t = w.cfg.train
    w.engine.train()
    centres = _epoch_centres(w, epoch) if t.sampler == "hard" and epoch > 0 else None
    real = w.stream.epoch(blocks.epoch(epoch), epoch, centres)
    step_in_epoch = state.step_in_epoch if epoch == state.epoch else 0
    for _ in range(step_in_epoch):
        # replay the batches a checkpoint already trained on, so the next ones are those
        # the uninterrupted run would have drawn (sampler RNG and window included)
        if next(real, None) is None:
            w.stream.pad()
    stats = EpochStats()
    t0 = time.time()
    for raw in eng.lockstep(real, w.stream, w.device):
        batch = Batch(model_input(raw["image"], w.cfg.transform, device=w.device, dtype=w.dtype),
                      torch.from_numpy(raw["label"]).to(w.device),
                      side_inputs(w.model, raw.get("camera"), w.device),  # {} unless the backbone has SIE
                      step=state.global_step)
        terms, acc = w.recipe.loss_terms(w.engine, batch)
        loss = weigh(terms, acc, w.device)
        w.engine.backward(loss.total)
        boundary = w.engine.is_gradient_accumulation_boundary()  # asked before step() moves it on
        w.engine.step()
        if w.sharded is not None and boundary:
            w.sharded.step()
        step_in_epoch += 1
        stats.steps += 1
        state.global_step += 1
        step = state.global_step
        stats.images += len(batch.labels)
        value = float(loss.total.detach())
        stats.loss_sum += value
        if w.trace:
            w.trace.write(json.dumps({"pid": os.getpid(), "epoch": epoch, "step": step,
                                      "row_ids": raw["row_id"].tolist()}) + "\n")
            w.trace.flush()
        if w.rank == 0 and step % t.log_every == 0:
            rate = stats.images / max(time.time() - t0, 1e-9)
            shown = {**loss.terms, "acc": loss.id_accuracy}
            log.info(progress_line(w, state, epoch, step_in_epoch, value, shown, rate))
            if step > w.logged_up_to:
                tracking.log_metrics(w.mlflow, w.plan.run_id, step_metrics(value, w.optimizer.param_groups[0]["lr"],
                                                                           rate, loss.terms, loss.id_accuracy), step=step)
        if t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0:
            state.epoch, state.step_in_epoch = epoch, step_in_epoch
            save_checkpoint(w, state, {"epoch": epoch, "global_step": step, "loss": value})
    stats.seconds = time.time() - t0
    if epoch == 0 and step_in_epoch == stats.steps:
        state.steps_per_epoch = stats.steps  # the measured length replaces the estimate
    stats.step_in_epoch = step_in_epoch
    return stats


def validate_and_export_best(w: Worker, state: TrainState, epoch: int) -> dict:
    """Rank-1/mAP on the query/gallery split (every rank takes part); export models/best on a new best."""
    t0 = time.time()
    w.engine.eval()
    scores = validate(w.engine.module.embedding, w.cfg.data_dir, w.cfg.transform, rank=w.rank, world=w.world,
                      device=w.device, dtype=w.dtype)
    w.engine.train()
    out = {}
    improved = False
    if w.rank == 0:
        out = {f"val_{k}": v for k, v in scores.items()}
        log.info(f"epoch {epoch + 1} validation: rank-1 {scores['rank1']:.4f} mAP {scores['mAP']:.4f}")
        if scores["mAP"] > state.best_mAP:
            state.best_mAP = scores["mAP"]
            improved = True
    if eng.broadcast_flag(improved, w.device):
        eng.export_from_engine(w.engine, w.cfg, w.rank, w.run_dir / "models" / "best",
                               extra={"mlflow_run_id": w.plan.run_id, "trained_steps": state.global_step,
                                      "epoch": epoch + 1, "val_mAP": state.best_mAP})
    state.validation_seconds = time.time() - t0
    return out


def end_epoch(w: Worker, state: TrainState, epoch: int, stats: EpochStats) -> None:
    """Decode-error tally, validation on schedule, MLflow, and the end-of-epoch checkpoint."""
    t = w.cfg.train
    state.decode_errors += eng.sum_over_workers(w.stream.decode_errors, w.device)
    w.stream.decode_errors = 0
    metrics = {
        "epoch": epoch + 1,
        "global_step": state.global_step,
        "epoch_loss": stats.loss_sum / max(stats.steps, 1),
        "epoch_steps": stats.step_in_epoch,
        "decode_errors": state.decode_errors,
        "images_per_s_per_worker": stats.images / max(stats.seconds, 1e-9),
    }
    if t.eval_every_epochs and ((epoch + 1) % t.eval_every_epochs == 0 or epoch + 1 == t.epochs):
        metrics.update(validate_and_export_best(w, state, epoch))
    state.epoch, state.step_in_epoch = epoch + 1, 0
    if w.rank == 0 and state.global_step > w.epochs_logged_up_to:
        tracking.log_metrics(w.mlflow, w.plan.run_id, epoch_metrics(metrics), step=state.global_step)
    save_checkpoint(w, state, metrics)


def finish(w: Worker, state: TrainState) -> None:
    """Export the last model (models/trained); the driver logs the exports as MLflow models."""
    eng.export_from_engine(w.engine, w.cfg, w.rank, w.run_dir / "models" / "trained",
                           extra={"mlflow_run_id": w.plan.run_id, "trained_steps": state.global_step})
    if w.trace:
        w.trace.close()


def train_loop_per_worker(loop_config: dict) -> None:
    w, state = set_up(loop_config["plan"])
    restore(w, state)
    blocks = epoch_blocks(w, state.epoch)
    for epoch in range(state.epoch, w.cfg.train.epochs):
        stats = run_epoch(w, state, epoch, blocks)
        end_epoch(w, state, epoch, stats)
    finish(w, state)
