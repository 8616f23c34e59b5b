"""The per-worker training loop: DeepSpeed engine, P×K steps, checkpoints, logging.

Runs inside a Ray Train worker (``train_loop_per_worker``). The same code runs on CPU
(gloo, fp32) and GPU (NCCL, bf16): the only device-specific choices are the device,
the process-group backend (made by the trainer) and the precision.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from reidscale.config import _build
from reidscale.data.pipeline import PKStream, worker_epoch_dataset
from reidscale.losses import cross_entropy_label_smooth, i2t_cross_entropy, triplet_batch_hard
from reidscale.models.reid import build_reid_model, export_embedding_model, side_inputs
from reidscale.train.checkpoint import use_safe_loading, verify_complete, write_rank_listing, write_state
from reidscale.train.config import TrainJobConfig
from reidscale.train.schedule import lr_factor

CHECKPOINT_TAG = "state"
# Ray Train routes worker logging to the job log once; a plain print() is teed twice when a
# library has wrapped sys.stdout.
log = logging.getLogger("reidscale.train")


def resolve_precision(precision: str, device: torch.device) -> str:
    """bf16 on devices that support it, else fp32 (DeepSpeed's fp16 path fails on CPU)."""
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def deepspeed_config(cfg: TrainJobConfig, precision: str) -> dict:
    t = cfg.train
    ds = {
        "train_micro_batch_size_per_gpu": t.p * t.k,
        "gradient_accumulation_steps": t.gradient_accumulation_steps,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": precision == "bf16"},
        "steps_per_print": 10**9,  # our own progress lines instead
        "wall_clock_breakdown": False,
    }
    if cfg.optim.grad_clip > 0:
        ds["gradient_clipping"] = cfg.optim.grad_clip
    return ds


def make_optimizer(model: torch.nn.Module, cfg: TrainJobConfig) -> torch.optim.Optimizer:
    # A client torch optimizer: DeepSpeed's own fused Adam would JIT-compile for ~60 s.
    # Partial FC's centres take no weight decay: its logits use L2-normalised centres, so decay
    # changes no logit, and it would rewrite every one of (up to millions of) rows each step when
    # only the sampled ones had a gradient. (Momentum still moves a row for a while after it was
    # last sampled, as in insightface's Partial FC v2.)
    cosine_centres = cfg.model.classifier == "partial_fc"
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        exempt = p.ndim <= 1 or name.endswith(".bias") or (cosine_centres and name == "classifier.weight")
        (no_decay if exempt else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    if cfg.optim.optimizer == "adam":
        return torch.optim.Adam(groups, lr=cfg.optim.lr)
    return torch.optim.AdamW(groups, lr=cfg.optim.lr)


def compute_loss(model, images, labels, cfg: TrainJobConfig, text_features: torch.Tensor | None = None,
                 cameras: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """(weighted total loss, {term: value, 'acc': ID accuracy}) of one batch.

    ``model`` is a ReIDModel (or a DeepSpeed engine around one), called with the labels so a
    Partial FC classifier scores only its sampled centres: the ID loss and accuracy use the
    returned ``targets`` (columns of the sampled logits), the metric losses the labels.
    ``cameras`` (N ints) reach a backbone with SIE; pass None for one without.
    """
    feat, logits, targets = model(images, labels=labels, cameras=cameras)
    terms = {}
    total = torch.zeros((), device=images.device)
    if cfg.loss.id_weight > 0:
        terms["id"] = cross_entropy_label_smooth(logits.float(), targets, epsilon=cfg.loss.label_smoothing)
        total = total + cfg.loss.id_weight * terms["id"]
    if cfg.loss.triplet_weight > 0:
        terms["triplet"] = triplet_batch_hard(
            feat.float(), labels, margin=cfg.loss.triplet_margin, soft_margin=cfg.loss.triplet_soft_margin
        )
        total = total + cfg.loss.triplet_weight * terms["triplet"]
    if text_features is not None and cfg.clipreid.i2t_weight > 0:
        # CLIP-ReID stage 2: each image against every identity's frozen text feature
        terms["i2t"] = i2t_cross_entropy(feat.float(), text_features, labels, 1.0, epsilon=cfg.loss.label_smoothing)
        total = total + cfg.clipreid.i2t_weight * terms["i2t"]
    with torch.no_grad():
        acc = (logits.argmax(1) == targets).float().mean()
    return total, {**{k: float(v.detach()) for k, v in terms.items()}, "acc": float(acc)}


def _any_worker(has_batch: bool, device: torch.device) -> bool:
    """True while any worker still has a real batch: all take the same number of steps."""
    flag = torch.tensor([1 if has_batch else 0], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def lockstep(real, stream: PKStream, device: torch.device):
    """This worker's batches until every worker's stream has run out; a worker whose stream
    ended first pads with ``stream.pad()``, so all take the same number of steps."""
    while True:
        batch = next(real, None)
        if not _any_worker(batch is not None, device):
            return
        yield batch if batch is not None else stream.pad()


def _sum_over_workers(value: int, device: torch.device) -> int:
    t = torch.tensor([value], device=device, dtype=torch.int64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return int(t.item())


def export_from_engine(engine, cfg: TrainJobConfig, rank: int, out_dir: Path, extra: dict) -> None:
    """Every rank calls this (ZeRO-3 must gather the partitioned weights); rank 0 writes."""
    if cfg.train.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            if rank == 0:
                export_embedding_model(engine.module.embedding, cfg.model, cfg.transform, out_dir, extra=extra)
    elif rank == 0:
        export_embedding_model(engine.module.embedding, cfg.model, cfg.transform, out_dir, extra=extra)


def _epoch_centres(engine, cfg: TrainJobConfig, epoch: int, rank: int):
    """L2-normalised class centres (the classifier's rows) as they stand at the start of ``epoch``.

    Written once per epoch by rank 0 and memory-mapped by every rank, so a run resumed in the
    middle of an epoch groups identities with the same centres the interrupted run used.
    """
    import numpy as np

    from reidscale.data.shards import atomic_write_bytes

    path = Path(cfg.run_dir) / "sampler" / f"centres-epoch{epoch:04d}.npy"
    # rank 0 decides, so that every rank enters (or skips) the ZeRO-3 gather together
    missing = torch.tensor([0 if path.exists() else 1], device=engine.device)
    if dist.is_initialized():
        dist.broadcast(missing, src=0)
    if missing.item():
        import io

        import deepspeed

        weight = engine.module.classifier.weight
        gather = deepspeed.zero.GatheredParameters([weight], modifier_rank=None) if cfg.train.zero_stage == 3 else None
        with gather if gather is not None else torch.no_grad():
            centres = torch.nn.functional.normalize(weight.detach().float(), dim=1).cpu().numpy().astype(np.float16)
        if rank == 0:
            path.parent.mkdir(parents=True, exist_ok=True)
            buf = io.BytesIO()
            np.save(buf, centres)
            atomic_write_bytes(path, buf.getvalue())
    if dist.is_initialized():
        dist.barrier()
    return np.load(path, mmap_mode="r")


def _logged_up_to(mlflow, run_id: str, key: str) -> int:
    """Highest step already in MLflow: after a restart those steps are not logged again."""
    history = mlflow.get_metric_history(run_id, key)
    return max((m.step for m in history), default=0)


def train_loop_per_worker(loop_config: dict) -> None:
    import deepspeed
    import ray.train
    import ray.train.torch

    from reidscale import tracking

    cfg = _build(TrainJobConfig, loop_config["cfg"])
    t = cfg.train
    num_classes = loop_config["num_classes"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    precision = resolve_precision(t.precision, device)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(t.seed)  # same init on every rank
    run_dir = Path(cfg.run_dir)
    run_id = loop_config["run_id"]
    checkpoint = ray.train.get_checkpoint()

    if cfg.recipe == "clipreid":
        from reidscale.models.open_clip_tower import wrap_tower
        from reidscale.models.prompt_learner import build_clip
        from reidscale.models.reid import ReIDModel, build_classifier

        c = cfg.clipreid
        size = (cfg.transform.height, cfg.transform.width)
        clip = build_clip(cfg.model, size, text_width=c.text_width, text_layers=c.text_layers,
                          text_heads=c.text_heads)
        # the ReID options (OLP, SIE, feature, classifier) on CLIP's image tower, weights shared
        tower = wrap_tower(clip.visual, cfg.model, size)
        model = ReIDModel(tower, tower.dim, num_classes, build_classifier(cfg.model, tower.dim, num_classes))
    else:
        model = build_reid_model(cfg.model, cfg.transform, num_classes)
    if rank == 0 and not checkpoint:
        # the untrained reference: the very weights training starts from
        export_embedding_model(model.embedding, cfg.model, cfg.transform, run_dir / "models" / "untrained",
                               extra={"mlflow_run_id": run_id, "trained_steps": 0})
    text_features = None
    if cfg.recipe == "clipreid":
        from reidscale.train.clipreid import run_stage1

        # before the stage-2 engine exists: stage 1 runs the image encoder frozen, outside any engine
        text_features = run_stage1(clip, cfg, loop_config, rank=rank, world=world, device=device,
                                   precision=precision, visual=tower).to(device)
        del clip.transformer  # the text tower is done; keep only what stage 2 trains
    optimizer = make_optimizer(model, cfg)
    # `state` is what a checkpoint restores. The schedule is in steps, but a streaming P×K
    # epoch's length is only estimated until the first epoch has run; it is corrected then
    # (before any cosine decay has started when warm-up lasts at least one epoch).
    state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "world_size": world,
             "steps_per_epoch": loop_config["steps_per_epoch"], "best_mAP": -1.0, "decode_errors": 0}

    def factor(step: int) -> float:
        # the scheduler steps once per optimizer step, i.e. every gradient_accumulation_steps batches
        spe = max(1, state["steps_per_epoch"] // t.gradient_accumulation_steps)
        return lr_factor(step, total_steps=spe * t.epochs, warmup_steps=int(round(cfg.optim.warmup_epochs * spe)),
                         schedule=cfg.optim.schedule, milestone_steps=[m * spe for m in cfg.optim.milestones],
                         gamma=cfg.optim.gamma)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    engine, _, _, _ = deepspeed.initialize(
        model=model.to(device), optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, precision), dist_init_required=False,
    )
    use_safe_loading(engine)

    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            restored = verify_complete(ckpt_dir)
            if restored["world_size"] != world:
                raise RuntimeError(f"checkpoint {checkpoint.path} was written by {restored['world_size']} workers, "
                                   f"this run has {world}; the sampler streams would differ")
            engine.load_checkpoint(ckpt_dir, tag=CHECKPOINT_TAG)
        state.update(restored)
        if rank == 0:
            log.info(f"resumed from {checkpoint.path}: epoch {state['epoch'] + 1}, step {state['step_in_epoch']} "
                     f"of it, global step {state['global_step']}")

    mlflow = tracking.client(loop_config["tracking_uri"]) if rank == 0 else None
    logged_up_to = _logged_up_to(mlflow, run_id, "loss") if rank == 0 else 0
    epochs_logged_up_to = _logged_up_to(mlflow, run_id, "epoch") if rank == 0 else 0
    stream = PKStream(t.p, t.k, seed=t.seed * 1_000_003 + rank, window_identities=t.window_identities or None,
                      mode=t.sampler, transform=cfg.transform)
    trace = open(f"{t.trace_file}.rank{rank}", "a") if t.trace_file else None
    start_time, start_step = time.time(), state["global_step"]

    def save(metrics: dict) -> None:
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=CHECKPOINT_TAG)
            write_rank_listing(tmp, rank)
            if rank == 0:
                write_state(tmp, state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))

    for epoch in range(state["epoch"], t.epochs):
        engine.train()
        dataset = worker_epoch_dataset(loop_config["row_groups"], cfg.transform, epoch=epoch, seed=t.seed,
                                       rank=rank, world=world, cpus_per_task=t.data_cpus_per_task)
        centres = _epoch_centres(engine, cfg, epoch, rank) if t.sampler == "hard" and epoch > 0 else None
        real = stream.epoch(dataset.iter_batches(batch_size=None, batch_format="numpy"), epoch, centres)
        step_in_epoch = state["step_in_epoch"] if epoch == state["epoch"] else 0
        for _ in range(step_in_epoch):
            # replay the batches a checkpoint already trained on, so the next ones are those
            # the uninterrupted run would have drawn (sampler RNG and window included)
            if next(real, None) is None:
                stream.pad()
        epoch_loss, epoch_steps, images, t0 = 0.0, 0, 0, time.time()
        for batch in lockstep(real, stream, device):
            images_t = torch.from_numpy(batch["image"]).to(device=device, dtype=dtype)
            labels = torch.from_numpy(batch["label"]).to(device)
            side = side_inputs(model, batch.get("camera"), device)  # {} unless the backbone has SIE
            loss, terms = compute_loss(engine, images_t, labels, cfg, text_features, **side)
            engine.backward(loss)
            engine.step()
            step_in_epoch += 1
            epoch_steps += 1
            state["global_step"] += 1
            step = state["global_step"]
            images += len(labels)
            epoch_loss += float(loss.detach())
            if trace:
                trace.write(json.dumps({"pid": os.getpid(), "epoch": epoch, "step": step,
                                        "row_ids": batch["row_id"].tolist()}) + "\n")
                trace.flush()
            if rank == 0 and step % t.log_every == 0:
                total = state["steps_per_epoch"] * t.epochs
                lr = optimizer.param_groups[0]["lr"]
                rate = images / max(time.time() - t0, 1e-9)
                per_step = (time.time() - start_time) / max(step - start_step, 1)
                log.info(
                    f"epoch {epoch + 1}/{t.epochs} step {step}/{total} loss {float(loss.detach()):.4f} "
                    + " ".join(f"{k} {v:.4f}" for k, v in terms.items())
                    + f" lr {lr:.2e} {rate:.1f} img/s/worker eta {max(total - step, 0) * per_step / 60:.1f} min"
                )
                if step > logged_up_to:
                    tracking.log_metrics(mlflow, run_id, {"loss": float(loss.detach()), "lr": lr, "images_per_s_per_worker": rate,
                                                          **{f"loss_{k}": v for k, v in terms.items()}}, step=step)
            if t.checkpoint_every_steps and step % t.checkpoint_every_steps == 0:
                state["epoch"], state["step_in_epoch"] = epoch, step_in_epoch
                save({"epoch": epoch, "global_step": step, "loss": float(loss.detach())})

        if epoch == 0 and step_in_epoch == epoch_steps:
            state["steps_per_epoch"] = epoch_steps
        state["decode_errors"] += _sum_over_workers(stream.decode_errors, device)
        stream.decode_errors = 0
        metrics = {
            "epoch": epoch + 1,
            "global_step": state["global_step"],
            "epoch_loss": epoch_loss / max(epoch_steps, 1),
            "epoch_steps": step_in_epoch,
            "decode_errors": state["decode_errors"],
            "images_per_s_per_worker": images / max(time.time() - t0, 1e-9),
        }
        if t.eval_every_epochs and ((epoch + 1) % t.eval_every_epochs == 0 or epoch + 1 == t.epochs):
            from reidscale.train.validation import validate

            engine.eval()
            scores = validate(engine.module.embedding, cfg.data_dir, cfg.transform, rank=rank, world=world,
                              device=device, dtype=dtype)
            engine.train()
            best = torch.tensor([0], device=device)
            if rank == 0:
                metrics.update({f"val_{k}": v for k, v in scores.items()})
                log.info(f"epoch {epoch + 1} validation: rank-1 {scores['rank1']:.4f} mAP {scores['mAP']:.4f}")
                if scores["mAP"] > state["best_mAP"]:
                    state["best_mAP"] = scores["mAP"]
                    best[0] = 1
            if dist.is_initialized():
                dist.broadcast(best, src=0)
            if best.item():
                export_from_engine(engine, cfg, rank, run_dir / "models" / "best",
                                   extra={"mlflow_run_id": run_id, "trained_steps": state["global_step"],
                                          "epoch": epoch + 1, "val_mAP": state["best_mAP"]})
        state["epoch"], state["step_in_epoch"] = epoch + 1, 0
        if rank == 0 and state["global_step"] > epochs_logged_up_to:
            tracking.log_metrics(mlflow, run_id, {f"epoch_{k}" if k != "epoch" else k: v for k, v in metrics.items()},
                                 step=state["global_step"])
        save(metrics)

    export_from_engine(engine, cfg, rank, run_dir / "models" / "trained",
                       extra={"mlflow_run_id": run_id, "trained_steps": state["global_step"]})
    if rank == 0:
        for name in ("trained", "best"):
            if (run_dir / "models" / name).is_dir():
                mlflow.log_artifacts(run_id, str(run_dir / "models" / name), artifact_path=f"models/{name}")
    if trace:
        trace.close()
