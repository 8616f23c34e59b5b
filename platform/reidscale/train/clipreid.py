"""CLIP-ReID stage 1 inside a training worker: learn identity prompts, freeze their text features.

Stage 1 trains only the prompt tokens (image and text encoders frozen) with the symmetric
supervised image↔text contrastive loss, on randomly drawn batches seen without augmentation
(the paper's recipe). The paper caches every training image's feature once; here image
features are computed on the fly from each worker's own stream, so nothing grows with the
training set: the cost is one frozen forward pass per image per stage-1 epoch.

The result, one text feature per identity, is written once to
``<run_dir>/clipreid/text_features.safetensors`` and into every checkpoint; a resumed run
finds it (in its run dir, or in the checkpoint it starts from: ``train.resume_from`` into a
new run dir) and skips stage 1.
Stage 2 is the ordinary training loop with one more loss term (``i2t`` in ``loop.compute_loss``).

With ``model.shard_classifier=true`` the identities are sharded as the ID head is
(``models/sharded_prompts.py``): each worker trains only its identity range's prompt tokens,
with its own Adam outside DeepSpeed (never all-reduced), the stage-1 losses over the
all-gathered global batch (``losses/sharded_image_text.py``), and keeps only its range's text
features, written as one table of per-range files (``<run_dir>/clipreid/text_features/``, and
``text_features/`` in every checkpoint) that any number of workers can read back.
"""

from __future__ import annotations

import logging
import time
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save

from reidscale import atomic
from reidscale.data.pipeline import PKStream, worker_epochs
from reidscale.losses import supervised_contrastive_i2t, supervised_contrastive_t2i
from reidscale.losses.sharded_image_text import sharded_supervised_contrastive
from reidscale.models.inference import model_input
from reidscale.models.prompt_learner import PromptLearner, Stage1Model, TextTower, all_text_features
from reidscale.models.sharded_fc import shard_range
from reidscale.models.sharded_prompts import (ShardedPromptLearner, has_text_feature_rows, load_text_feature_rows,
                                              prompt_optimizer, range_text_features, save_text_feature_rows)
from reidscale.train.checkpoint import verified_file
from reidscale.train.engine import barrier, broadcast_flag, deepspeed_config, initialize_deepspeed, lockstep
from reidscale.train.schedule import lr_factor

log = logging.getLogger("reidscale.train")  # one logger name for the job log's training lines
TEXT_FEATURES = "text_features.safetensors"
TEXT_FEATURE_ROWS = "text_features"  # the sharded table's directory (model.shard_classifier)


def run_stage1(clip, ctx, visual=None) -> torch.Tensor:
    """Train the prompts (or load their result) and return text features (classes × D, float32).

    ``visual`` is the ReID image tower wrapped around ``clip.visual`` (``wrap_tower``; its
    overlapping patches change the shared patch conv), else ``clip.visual`` itself; stage 1
    uses its projected class token, without side information (as CLIP-ReID's stage 1 does).
    ``ctx`` is the worker's context (``loop.Worker``: plan, rank, world, device, precision).
    """
    cfg, c = ctx.cfg, ctx.cfg.clipreid
    num_classes = ctx.plan.num_classes
    if cfg.model.shard_classifier:
        return _run_stage1_sharded(clip, ctx, visual)
    out = Path(cfg.run_dir) / "clipreid" / TEXT_FEATURES
    if out.is_file():
        log.info(f"stage 1 already done: text features from {out}")
        return load_file(str(out))["text_features"]
    from_checkpoint = _checkpoint_text_features(ctx)
    if from_checkpoint is not None:
        # no barrier here: a slower rank may already find this copy above and return through
        # the "already done" branch, and a barrier it never reaches would hang rank 0 (seen)
        if ctx.rank == 0:
            save_text_features(out.parent, from_checkpoint)
        return from_checkpoint

    stage1 = Stage1Model(PromptLearner(num_classes, clip.token_embedding, n_ctx=c.n_ctx, noun=c.noun), TextTower(clip))
    visual = (visual if visual is not None else clip.visual).to(ctx.device)
    with _frozen(visual):
        engine = _stage1_engine(stage1.to(ctx.device), ctx)
        _train_prompts(_engine_step(engine), visual, ctx)
        engine.eval()
        features = all_text_features(engine.module, num_classes, rank=ctx.rank, world=ctx.world)
        if ctx.rank == 0:
            save_text_features(out.parent, features)
        barrier()
    return features


def _run_stage1_sharded(clip, ctx, visual=None) -> torch.Tensor:
    """``run_stage1`` with identities sharded: this worker's rows ``shard_range(C, rank, world)``
    of the text features ([hi - lo, D], float32). A collective: every branch is decided by rank 0
    (``broadcast_flag``), so no worker skips a save the others wait in."""
    cfg, c = ctx.cfg, ctx.cfg.clipreid
    num_classes = ctx.plan.num_classes
    lo, hi = shard_range(num_classes, ctx.rank, ctx.world)
    table = Path(cfg.run_dir) / "clipreid" / TEXT_FEATURE_ROWS
    if broadcast_flag(has_text_feature_rows(table), ctx.device):
        log.info(f"stage 1 already done: text features [{lo}, {hi}) from {table}")
        return load_text_feature_rows(table, num_classes, lo, hi)
    checkpoint = getattr(ctx, "checkpoint", None)
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            in_checkpoint = Path(directory) / TEXT_FEATURE_ROWS
            if broadcast_flag(has_text_feature_rows(in_checkpoint), ctx.device):
                log.info(f"stage 1 already done: text features [{lo}, {hi}) from checkpoint {checkpoint.path}")
                rows = load_text_feature_rows(in_checkpoint, num_classes, lo, hi)
                save_text_feature_rows(rows, lo, num_classes, table)
                return rows

    prompts = ShardedPromptLearner(num_classes, clip.token_embedding, n_ctx=c.n_ctx, noun=c.noun, seed=cfg.train.seed,
                                   rank=ctx.rank, world=ctx.world)
    stage1 = Stage1Model(prompts, TextTower(clip)).to(ctx.device)
    if ctx.rank == 0:
        log.info(f"stage 1, identities sharded: each of {ctx.world} workers trains the prompts of "
                 f"{hi - lo} of {num_classes} identities")
    visual = (visual if visual is not None else clip.visual).to(ctx.device)
    with _frozen(visual):
        _train_prompts(_sharded_step(stage1, lo, hi, ctx), visual, ctx)
        stage1.eval()
        rows = range_text_features(stage1, lo, hi)
    save_text_feature_rows(rows, lo, num_classes, table)  # a collective: every worker its file, rank 0 the index
    return rows


def _engine_step(engine):
    """The replicated stage-1 step: each worker's own batch, DeepSpeed averages the prompts' gradient."""

    def step(image_features, labels):
        text_features = engine(labels).float()
        loss = (supervised_contrastive_i2t(image_features, text_features, labels, 1.0)
                + supervised_contrastive_t2i(image_features, text_features, labels, 1.0))
        engine.backward(loss)
        engine.step()
        return loss, engine.get_lr()[0]

    return step


def _sharded_step(stage1, lo, hi, ctx):
    """The sharded stage-1 step: the contrastive losses over the global batch, this worker's prompt
    rows stepped by their own Adam (the schedule of ``_stage1_engine``), nothing all-reduced."""
    c = ctx.cfg.clipreid
    optimizer = prompt_optimizer(stage1.prompts, c.stage1_lr, c.stage1_weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _stage1_factor(ctx))
    bf16 = ctx.precision == "bf16"  # the text tower in bf16 as DeepSpeed would run it; the losses upcast

    def step(image_features, labels):
        with torch.autocast(ctx.device.type, dtype=torch.bfloat16, enabled=bf16):
            i2t, t2i = sharded_supervised_contrastive(image_features, labels, stage1, lo, hi)
        loss = i2t + t2i
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        return loss, optimizer.param_groups[0]["lr"]

    return step


def _stage1_factor(ctx):
    """Stage 1's lr factor per step: warm-up, then cosine over all stage-1 steps."""
    c = ctx.cfg.clipreid
    steps_per_epoch = max(1, ctx.plan.stage1_steps_per_epoch)
    return lambda s: lr_factor(s, total_steps=steps_per_epoch * c.stage1_epochs,
                               warmup_steps=int(c.stage1_warmup_epochs * steps_per_epoch), schedule="cosine")


def save_text_features(directory: Path, features: torch.Tensor) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(directory / TEXT_FEATURES, save({"text_features": features.detach().float().cpu().contiguous()}))


def _checkpoint_text_features(ctx) -> torch.Tensor | None:
    """The text features stored in the checkpoint this run starts from (sha256 checked), if any."""
    if getattr(ctx, "checkpoint", None) is None:
        return None
    with ctx.checkpoint.as_directory() as directory:
        path = verified_file(directory, TEXT_FEATURES)
        if path is None:
            return None
        log.info(f"stage 1 already done: text features from checkpoint {ctx.checkpoint.path}")
        return load_file(str(path))["text_features"]


@contextmanager
def _frozen(visual):
    """The image tower in eval mode without gradients for stage 1, trainable again afterwards."""
    visual.eval()
    for p in visual.parameters():
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in visual.parameters():
            p.requires_grad_(True)
        visual.train()


def _stage1_engine(stage1, ctx):
    """A DeepSpeed engine over the prompt tokens only: Adam, warm-up then cosine over stage 1's steps."""
    cfg, c = ctx.cfg, ctx.cfg.clipreid
    optimizer = prompt_optimizer(stage1.prompts, c.stage1_lr, c.stage1_weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _stage1_factor(ctx))
    # stage 1's batches are P identities × 1 image; ZeRO-3 would shard a tensor this small for nothing
    ds_cfg = deepspeed_config(replace(cfg, train=replace(cfg.train, p=c.stage1_batch, k=1,
                                                         zero_stage=min(cfg.train.zero_stage, 2))), ctx.precision)
    engine, _, _, _ = initialize_deepspeed(model=stage1, optimizer=optimizer, lr_scheduler=scheduler, config=ds_cfg)
    return engine


def _train_prompts(step_fn, visual, ctx) -> None:
    """Stage 1's epochs: each worker's own un-augmented stream, symmetric image↔text contrastive
    loss; ``step_fn(image_features, labels) -> (loss, lr)`` takes one optimizer step on the
    frozen ``visual`` tower's embeddings."""
    cfg, c, rank, device = ctx.cfg, ctx.cfg.clipreid, ctx.rank, ctx.device
    project = (lambda x: visual.features(x)[1]) if hasattr(visual, "features") else visual
    # seeds apart from stage 2's, so the two stages do not see the same order
    stream = PKStream(c.stage1_batch, 1, seed=cfg.train.seed * 1_000_003 + rank + 7919, mode="random")
    step, t0 = 0, time.time()
    blocks = worker_epochs(ctx.plan.row_groups, cfg.transform, epochs=range(c.stage1_epochs),
                           seed=cfg.train.seed + 7919, rank=rank, world=ctx.world, train=False,
                           cpus_per_task=cfg.train.data_cpus_per_task, rows_per_task=cfg.train.data_rows_per_task)
    for epoch in range(c.stage1_epochs):
        real = stream.epoch(blocks.epoch(epoch), epoch)
        for batch in lockstep(real, stream, device):
            labels = torch.from_numpy(batch["label"]).to(device)
            with torch.no_grad():
                image_features = project(model_input(batch["image"], cfg.transform, device=device)).float()
            loss, lr = step_fn(image_features, labels)
            step += 1
            if rank == 0 and step % cfg.train.log_every == 0:
                log.info(f"stage 1 epoch {epoch + 1}/{c.stage1_epochs} step {step} loss {float(loss.detach()):.4f} "
                         f"lr {lr:.2e} {(time.time() - t0) / step:.2f} s/step")
