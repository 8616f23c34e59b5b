"""The per-worker training loop: DeepSpeed engine, P×K steps, checkpoints, logging.

Runs inside a Ray Train worker (``train_loop_per_worker``). The same code runs on CPU
(gloo, fp32) and GPU (NCCL, bf16): the only device-specific choices are the device,
the process-group backend (made by the trainer) and the precision.
"""

from __future__ import annotations

import logging
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from reidscale.config import _build
from reidscale.data.pipeline import PKStream
from reidscale.losses import cross_entropy_label_smooth, triplet_batch_hard
from reidscale.models.reid import build_reid_model, export_embedding_model
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
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    groups = [
        {"params": decay, "weight_decay": cfg.optim.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if cfg.optim.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.optim.lr, momentum=cfg.optim.momentum)
    return torch.optim.AdamW(groups, lr=cfg.optim.lr)


def compute_loss(model, images, labels, cfg: TrainJobConfig) -> tuple[torch.Tensor, dict]:
    feat, logits = model(images)
    terms = {}
    total = torch.zeros((), device=images.device)
    if cfg.loss.id_weight > 0:
        terms["id"] = cross_entropy_label_smooth(logits.float(), labels, epsilon=cfg.loss.label_smoothing)
        total = total + cfg.loss.id_weight * terms["id"]
    if cfg.loss.triplet_weight > 0:
        terms["triplet"] = triplet_batch_hard(
            feat.float(), labels, margin=cfg.loss.triplet_margin, soft_margin=cfg.loss.triplet_soft_margin
        )
        total = total + cfg.loss.triplet_weight * terms["triplet"]
    with torch.no_grad():
        acc = (logits.argmax(1) == labels).float().mean()
    return total, {**{k: float(v.detach()) for k, v in terms.items()}, "acc": float(acc)}


def _all_have_batch(has_batch: bool, device: torch.device) -> bool:
    """Every worker must take the same number of steps, or a collective hangs."""
    flag = torch.tensor([1 if has_batch else 0], device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
    return bool(flag.item())


def train_loop_per_worker(loop_config: dict) -> None:
    import deepspeed
    import ray.train
    import ray.train.torch

    from reidscale import tracking

    cfg = _build(TrainJobConfig, loop_config["cfg"])
    num_classes = loop_config["num_classes"]
    steps_per_epoch = loop_config["steps_per_epoch"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    precision = resolve_precision(cfg.train.precision, device)
    torch.manual_seed(cfg.train.seed)  # same init on every rank

    model = build_reid_model(cfg.model, cfg.transform, num_classes)
    run_dir = Path(cfg.run_dir)
    if rank == 0 and not ray.train.get_checkpoint():
        # the untrained reference: the very weights training starts from
        export_embedding_model(model.embedding, cfg.model, cfg.transform, run_dir / "models" / "untrained",
                               extra={"mlflow_run_id": loop_config["run_id"], "trained_steps": 0})
    optimizer = make_optimizer(model, cfg)
    # The schedule is in steps, but a streaming P×K epoch's length is only estimated until the
    # first epoch has run; `plan` is corrected then (before any cosine decay has started when
    # warm-up lasts at least one epoch).
    plan = {"steps_per_epoch": steps_per_epoch}

    def factor(step: int) -> float:
        spe = plan["steps_per_epoch"]
        return lr_factor(step, total_steps=spe * cfg.train.epochs, warmup_steps=int(round(cfg.optim.warmup_epochs * spe)),
                         schedule=cfg.optim.schedule, milestone_steps=[m * spe for m in cfg.optim.milestones],
                         gamma=cfg.optim.gamma)

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    engine, _, _, _ = deepspeed.initialize(
        model=model.to(device), optimizer=optimizer, lr_scheduler=scheduler,
        config=deepspeed_config(cfg, precision), dist_init_required=False,
    )

    start_epoch, global_step = 0, 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as ckpt_dir:
            _, client_state = engine.load_checkpoint(ckpt_dir, tag=CHECKPOINT_TAG)
        start_epoch, global_step = client_state["epoch"] + 1, client_state["global_step"]
        plan["steps_per_epoch"] = client_state.get("steps_per_epoch", steps_per_epoch)

    mlflow = tracking.client(loop_config["tracking_uri"]) if rank == 0 else None
    run_id = loop_config["run_id"]
    stream = PKStream(cfg.train.p, cfg.train.k, seed=cfg.train.seed * 1000 + rank)
    shard = ray.train.get_dataset_shard("train")
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    start_time = time.time()

    for epoch in range(start_epoch, cfg.train.epochs):
        engine.train()
        batches = stream.epoch(shard, epoch)
        epoch_loss, epoch_steps, images = 0.0, 0, 0
        t0 = time.time()
        while True:
            batch = next(batches, None)
            if not _all_have_batch(batch is not None, device):
                break
            images_t = torch.from_numpy(batch["image"]).to(device=device, dtype=dtype)
            labels = torch.from_numpy(batch["label"]).to(device)
            loss, terms = compute_loss(engine, images_t, labels, cfg)
            engine.backward(loss)
            engine.step()
            global_step += 1
            epoch_steps += 1
            images += len(labels)
            epoch_loss += float(loss.detach())
            if rank == 0 and global_step % cfg.train.log_every == 0:
                total_steps = plan["steps_per_epoch"] * cfg.train.epochs
                lr = optimizer.param_groups[0]["lr"]
                rate = images / max(time.time() - t0, 1e-9)
                done = global_step / max(total_steps, 1)
                eta = (time.time() - start_time) / max(done, 1e-9) * (1 - done) if done > 0 else float("nan")
                log.info(
                    f"epoch {epoch + 1}/{cfg.train.epochs} step {global_step}/{total_steps} "
                    f"loss {float(loss):.4f} "
                    + " ".join(f"{k} {v:.4f}" for k, v in terms.items())
                    + f" lr {lr:.2e} {rate:.1f} img/s/worker eta {eta / 60:.1f} min"
                )
                tracking.log_metrics(mlflow, run_id, {"loss": float(loss), "lr": lr, "images_per_s_per_worker": rate,
                                                      **{f"loss_{k}": v for k, v in terms.items()}}, step=global_step)

        if epoch == 0:
            plan["steps_per_epoch"] = epoch_steps
        metrics = {
            "epoch": epoch + 1,
            "global_step": global_step,
            "epoch_loss": epoch_loss / max(epoch_steps, 1),
            "epoch_steps": epoch_steps,
            "decode_errors": stream.decode_errors,
            "images_per_s_per_worker": images / max(time.time() - t0, 1e-9),
        }
        with tempfile.TemporaryDirectory() as tmp:
            engine.save_checkpoint(tmp, tag=CHECKPOINT_TAG,
                                   client_state={"epoch": epoch, "global_step": global_step,
                                                 "steps_per_epoch": plan["steps_per_epoch"]})
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        if rank == 0:
            tracking.log_metrics(mlflow, run_id, {f"epoch_{k}" if k not in ("epoch",) else k: v
                                                  for k, v in metrics.items()}, step=global_step)

    if rank == 0:
        export_embedding_model(engine.module.embedding, cfg.model, cfg.transform, run_dir / "models" / "trained",
                               extra={"mlflow_run_id": run_id, "trained_steps": global_step})
