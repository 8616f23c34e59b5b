"""DeepSpeed mechanics shared by every recipe and stage: precision, optimizer, schedule,
the engine itself, lockstep batches across workers, and exporting from an engine.

Nothing here knows which recipe runs; ``loop.py`` and ``clipreid.py`` (stage 1) both build
their engines from these pieces.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from reidscale.models.reid import export_embedding_model
from reidscale.models.sharded_fc import ShardedPartialFC, head_optimizer
from reidscale.train.checkpoint import use_safe_loading
from reidscale.train.config import TrainJobConfig
from reidscale.train.schedule import lr_factor


def resolve_precision(precision: str, device: torch.device) -> str:
    """bf16 on devices that support it, else fp32 (DeepSpeed's fp16 path fails on CPU)."""
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def compute_dtype(precision: str) -> torch.dtype:
    return torch.bfloat16 if precision == "bf16" else torch.float32


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
    # always written: DeepSpeed's own default is 1.0, so leaving the key out when grad_clip is 0
    # ("no clipping") clipped every step at norm 1.0 and cost a norm over all gradients
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


def stage2_schedule(cfg: TrainJobConfig, steps_per_epoch: Callable[[], int]) -> Callable[[int], float]:
    """lr factor per optimizer step. ``steps_per_epoch`` is read at every step: a streaming
    P×K epoch's length is only estimated until the first epoch has run, and corrected then
    (before any cosine decay has started when warm-up lasts at least one epoch)."""
    t = cfg.train

    def factor(step: int) -> float:
        # the scheduler steps once per optimizer step, i.e. every gradient_accumulation_steps batches
        spe = max(1, steps_per_epoch() // t.gradient_accumulation_steps)
        return lr_factor(step, total_steps=spe * t.epochs, warmup_steps=int(round(cfg.optim.warmup_epochs * spe)),
                         schedule=cfg.optim.schedule, milestone_steps=[m * spe for m in cfg.optim.milestones],
                         gamma=cfg.optim.gamma)

    return factor


def initialize_deepspeed(**kwargs):
    """``deepspeed.initialize`` on the process group Ray Train made, without DeepSpeed's shared
    memory all-reduce op; returns what it returns.

    The first initialisation in a process builds DeepSpeed's communication backend, which on a
    CPU loads that op (``deepspeed.comm.torch.build_shm_op``): a C++ extension compiled on first
    use, 25.7 s here, while the other workers wait on its lock, and a failed run ("Error building
    extension 'deepspeed_shm_comm'") on a machine without a C++ compiler. Only DeepSpeed's
    tensor-parallel inference all-reduce uses the op, and only when ``LOCAL_SIZE`` equals the
    world size; training never calls it, and without it that all-reduce is torch.distributed's.
    A DeepSpeed without the function is left as it is.
    """
    import deepspeed

    # not ``import deepspeed.comm.torch as ...``: that binds deepspeed.comm's attribute ``torch``,
    # the torch package itself
    ds_comm_torch = importlib.import_module("deepspeed.comm.torch")
    build = getattr(ds_comm_torch, "build_shm_op", None)
    if build is not None:
        ds_comm_torch.build_shm_op = lambda: None
    try:
        return deepspeed.initialize(dist_init_required=False, **kwargs)
    finally:
        if build is not None:
            ds_comm_torch.build_shm_op = build


def build_engine(model: torch.nn.Module, optimizer, factor: Callable[[int], float], ds_config: dict, device):
    """A DeepSpeed engine around ``model`` with a LambdaLR schedule; checkpoints load without unpickling."""
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    engine, _, _, _ = initialize_deepspeed(model=model.to(device), optimizer=optimizer, lr_scheduler=scheduler,
                                           config=ds_config)
    if engine.dp_world_size == 1 and not engine.zero_optimization():
        # averaging gradients over one rank changes nothing, yet costs a flatten, an all-reduce
        # and a copy back per step (2.7% of a step for the demo model)
        engine.enable_backward_allreduce = False
    use_safe_loading(engine)
    return engine


@dataclass
class ShardedHead:
    """The sharded ID head and what steps it, beside (never inside) the DeepSpeed engine."""

    head: ShardedPartialFC
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR

    def step(self) -> None:
        """After ``engine.step()`` at a gradient-accumulation boundary: the engine's
        ``backward`` already scaled the loss by 1/accumulation steps, so the accumulated
        centre gradient is the mean over the micro-batches, as the backbone's is."""
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()


def build_sharded_head(cfg: TrainJobConfig, dim: int, num_classes: int, factor: Callable[[int], float],
                       device) -> ShardedHead:
    """This worker's identity range of the ID table (``model.shard_classifier``); a collective
    at every forward. Same lr schedule as the engine; no weight decay (see ``make_optimizer``)."""
    m = cfg.model
    head = ShardedPartialFC(dim, num_classes, sample_rate=m.sample_rate, scale=m.cosine_scale, margin=m.cosine_margin,
                            label_smoothing=cfg.loss.label_smoothing, seed=cfg.train.seed).to(device)
    optimizer = head_optimizer(head, cfg.optim.optimizer, cfg.optim.lr, cfg.optim.momentum)
    return ShardedHead(head, optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor))


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def any_worker(has_batch: bool, device: torch.device) -> bool:
    """True while any worker still has a real batch: all take the same number of steps."""
    flag = torch.tensor([1 if has_batch else 0], device=device)
    if _distributed():
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def lockstep(real: Iterator, stream, device: torch.device) -> Iterator:
    """This worker's batches until every worker's stream has run out; a worker whose stream
    ended first pads with ``stream.pad()``, so all take the same number of steps."""
    while True:
        batch = next(real, None)
        if not any_worker(batch is not None, device):
            return
        yield batch if batch is not None else stream.pad()


def sum_over_workers(value: int, device: torch.device) -> int:
    t = torch.tensor([value], device=device, dtype=torch.int64)
    if _distributed():
        dist.all_reduce(t)
    return int(t.item())


def broadcast_flag(flag: bool, device: torch.device) -> bool:
    """Rank 0's ``flag`` on every rank (so all ranks enter a collective together, or none does)."""
    t = torch.tensor([1 if flag else 0], device=device)
    if _distributed():
        dist.broadcast(t, src=0)
    return bool(t.item())


def barrier() -> None:
    if _distributed():
        dist.barrier()


def export_from_engine(engine, cfg: TrainJobConfig, rank: int, out_dir: Path, extra: dict) -> None:
    """Every rank calls this (ZeRO-3 must gather the partitioned weights); rank 0 writes."""
    if cfg.train.zero_stage == 3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(engine.module.parameters()), modifier_rank=None):
            if rank == 0:
                export_embedding_model(engine.module.embedding, cfg.model, cfg.transform, out_dir, extra=extra)
    elif rank == 0:
        export_embedding_model(engine.module.embedding, cfg.model, cfg.transform, out_dir, extra=extra)
