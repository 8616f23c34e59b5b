"""Training recipes: what model a run trains and which loss terms a batch contributes.

A recipe is chosen once (``recipe_for``) and the loop asks it three things:
``build_model(num_classes)``, ``before_training(ctx)`` (CLIP-ReID's stage 1; nothing for the
baseline) and ``loss_terms(model, batch)`` → ``{name: (weight, loss tensor)}``. The loop owns
the engine, the schedule, checkpoints, logging and validation. A new recipe (TransReID's JPM,
a center-loss variant) is one more class here and one more ``recipe`` value in the config.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from pathlib import Path

import torch

from reidscale.losses import cross_entropy_label_smooth, i2t_cross_entropy, triplet_batch_hard
from reidscale.losses.sharded_image_text import sharded_i2t_cross_entropy
from reidscale.models.open_clip_tower import wrap_tower
from reidscale.models.prompt_learner import build_clip
from reidscale.models.reid import ReIDModel, build_classifier, build_reid_model
from reidscale.models.sharded_fc import shard_range
from reidscale.models.sharded_prompts import save_text_feature_rows
from reidscale.train.clipreid import TEXT_FEATURE_ROWS, run_stage1, save_text_features
from reidscale.train.config import TrainJobConfig

log = logging.getLogger(__name__)


@dataclass
class Batch:
    """One training batch on the device: images, identity labels, and side inputs (cameras for SIE)."""

    images: torch.Tensor
    labels: torch.Tensor
    side: dict = field(default_factory=dict)
    step: int = 0  # the global optimizer step: seeds the sharded head's negatives


@dataclass
class StepLoss:
    total: torch.Tensor
    terms: dict[str, float]  # each term's unweighted value, for logging
    id_accuracy: float


def weigh(terms: dict[str, tuple[float, torch.Tensor]], id_accuracy: float, device) -> StepLoss:
    total = torch.zeros((), device=device)
    for weight, value in terms.values():
        total = total + weight * value
    return StepLoss(total, {k: float(v.detach()) for k, (_, v) in terms.items()}, id_accuracy)


def id_and_metric_terms(model, batch: Batch, cfg: TrainJobConfig,
                        head=None) -> tuple[dict, float, torch.Tensor]:
    """BoT's terms: label-smoothed CE on the classifier and batch-hard triplet on the feature.

    ``model`` is a ReIDModel (or a DeepSpeed engine around one), called with the labels so a
    Partial FC classifier scores only its sampled centres: the ID loss and accuracy use the
    returned ``targets`` (columns of the sampled logits), the metric losses the labels.
    With ``head`` (a ``ShardedPartialFC`` outside the engine) the model's classifier passes the
    neck feature through and the head scores it across the workers: every rank must then call
    this for every batch (the head is a collective). Returns (terms, ID accuracy, the feature)
    so a recipe can add terms on the same feature.
    """
    feat, logits, targets = model(batch.images, labels=batch.labels, **batch.side)
    terms = {}
    acc = 0.0
    if head is not None:
        if cfg.loss.id_weight > 0:
            out = head(logits, batch.labels, batch.step)  # `logits` is the neck feature here
            terms["id"] = (cfg.loss.id_weight, out.loss)
            acc = float(out.accuracy)
    else:
        if cfg.loss.id_weight > 0:
            terms["id"] = (cfg.loss.id_weight,
                           cross_entropy_label_smooth(logits.float(), targets, epsilon=cfg.loss.label_smoothing))
        with torch.no_grad():
            acc = float((logits.argmax(1) == targets).float().mean())
    if cfg.loss.triplet_weight > 0:
        terms["triplet"] = (cfg.loss.triplet_weight, triplet_batch_hard(
            feat.float(), batch.labels, margin=cfg.loss.triplet_margin, soft_margin=cfg.loss.triplet_soft_margin))
    return terms, acc, feat


class BaselineRecipe:
    """The BoT strong baseline: one stage, ID + triplet on a BNNeck."""

    name = "baseline"

    def __init__(self, cfg: TrainJobConfig):
        self.cfg = cfg
        self.head = None  # the sharded ID head (model.shard_classifier), set once the workers' group exists

    def build_model(self, num_classes: int) -> ReIDModel:
        return build_reid_model(self.cfg.model, self.cfg.transform, num_classes)

    def before_training(self, ctx) -> None:
        """Runs once per worker after the untrained export, before the stage-2 engine exists."""

    def save_to_checkpoint(self, directory: Path, rank: int) -> None:
        """Write what the recipe needs to resume, beyond the engine's state, into a checkpoint."""

    def loss_terms(self, model, batch: Batch) -> tuple[dict, float]:
        terms, acc, _ = id_and_metric_terms(model, batch, self.cfg, self.head)
        return terms, acc


class ClipReIDRecipe(BaselineRecipe):
    """CLIP-ReID: stage 1 learns per-identity prompts against the frozen CLIP encoders; stage 2
    is the baseline plus an image→text term against those (frozen) identity text features."""

    name = "clipreid"

    def __init__(self, cfg: TrainJobConfig):
        super().__init__(cfg)
        self.clip = None
        self.tower = None
        # every identity's text feature; with model.shard_classifier only identities
        # [text_lo, text_lo + len) of this worker's range, of num_classes
        self.text_features: torch.Tensor | None = None
        self.text_lo, self.num_classes = 0, 0

    def build_model(self, num_classes: int) -> ReIDModel:
        c, size = self.cfg.clipreid, (self.cfg.transform.height, self.cfg.transform.width)
        self.clip = build_clip(self.cfg.model, size, text_width=c.text_width, text_layers=c.text_layers,
                               text_heads=c.text_heads)
        # the ReID options (OLP, SIE, feature, classifier) on CLIP's image tower, weights shared
        self.tower = wrap_tower(self.clip.visual, self.cfg.model, size)
        return ReIDModel(self.tower, self.tower.dim, num_classes, build_classifier(self.cfg.model, self.tower.dim,
                                                                                   num_classes))

    def before_training(self, ctx) -> None:
        # stage 1 runs the image encoder frozen, outside any engine
        self.text_features = run_stage1(self.clip, ctx, visual=self.tower).to(ctx.device)
        self.num_classes = ctx.plan.num_classes
        if self.cfg.model.shard_classifier:
            self.text_lo = shard_range(self.num_classes, ctx.rank, ctx.world)[0]
        del self.clip.transformer  # the text tower is done; keep only what stage 2 trains

    def save_to_checkpoint(self, directory: Path, rank: int) -> None:
        # stage 2 was trained against these: a run started from this checkpoint elsewhere
        # (train.resume_from) must use them, not learn new prompts
        if self.text_features is None:
            return
        if self.cfg.model.shard_classifier:  # a collective: every worker its rows, rank 0 the index
            save_text_feature_rows(self.text_features, self.text_lo, self.num_classes,
                                   Path(directory) / TEXT_FEATURE_ROWS)
        elif rank == 0:
            save_text_features(Path(directory), self.text_features)

    def loss_terms(self, model, batch: Batch) -> tuple[dict, float]:
        terms, acc, feat = id_and_metric_terms(model, batch, self.cfg, self.head)
        if self.text_features is not None and self.cfg.clipreid.i2t_weight > 0:
            # each image against every identity's frozen text feature
            if self.cfg.model.shard_classifier:  # a collective, the softmax split over the workers' identities
                i2t = sharded_i2t_cross_entropy(feat.float(), batch.labels, self.text_features, self.text_lo, 1.0,
                                                epsilon=self.cfg.loss.label_smoothing)
            else:
                i2t = i2t_cross_entropy(feat.float(), self.text_features, batch.labels, 1.0,
                                        epsilon=self.cfg.loss.label_smoothing)
            terms["i2t"] = (self.cfg.clipreid.i2t_weight, i2t)
        return terms, acc


def recipe_for(cfg: TrainJobConfig) -> BaselineRecipe:
    """The one place ``cfg.recipe`` is looked at."""
    return ClipReIDRecipe(cfg) if cfg.recipe == "clipreid" else BaselineRecipe(cfg)


def compute_loss(model, images, labels, cfg: TrainJobConfig, text_features: torch.Tensor | None = None,
                 cameras: torch.Tensor | None = None) -> tuple[torch.Tensor, dict]:
    """(weighted total loss, {term: value, 'acc': ID accuracy}) of one batch, as a plain function.

    The recipe path without a worker: CLIP-ReID's stage-2 terms when ``text_features`` is given,
    the baseline's otherwise. ``cameras`` (N ints) reach a backbone with SIE.
    """
    recipe = ClipReIDRecipe(cfg) if text_features is not None else BaselineRecipe(cfg)
    if text_features is not None:
        recipe.text_features = text_features
    batch = Batch(images, labels, {"cameras": cameras} if cameras is not None else {})
    terms, acc = recipe.loss_terms(model, batch)
    loss = weigh(terms, acc, images.device)
    return loss.total, {**loss.terms, "acc": loss.id_accuracy}
