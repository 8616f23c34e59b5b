"""Model-parallel Partial FC: the ID head's centres sharded by identity range over the ranks.

Partial FC v2 (An et al., ICCVW 2021; insightface ``arcface_torch/partial_fc_v2.py``) without a
copy of the table per worker. Rank k of W owns the contiguous identities ``[lo, hi)``
(``shard_range``) and their centres; the table lives **outside the DeepSpeed engine** (its own
optimizer, never all-reduced: the rows of two ranks are different classes). One step:

1. the features (B × D per rank, the same B on every rank) and labels are all-gathered: every
   shard scores the whole global batch (W·B rows);
2. each shard samples its columns: every identity of the global batch that falls in its range
   (positives, ascending) plus random others up to ``ceil(sample_rate · (hi - lo))``
   (negatives; seeded by ``(seed, step, lo)``, so a resumed run draws the same ones);
3. logits = ``scale`` · cos(feature, centre), minus ``margin`` on the true class (CosFace), as
   ``classifier.PartialFC`` computes them;
4. label-smoothed cross-entropy over *all* sampled columns of all shards, exactly: an
   all-reduce of the row maxima, then one of (sum of exp, true-class logit, sum of logits)
   (``sharded_cross_entropy``, shared with CLIP-ReID's sharded losses in
   ``losses/sharded_image_text.py``). The loss is the global batch's mean, the same on every rank.

Gradient scale. Backward gives each shard's logits ``∂L/∂z`` of the global mean loss, so
the centres get exactly the replicated head's gradient. The features: the gather's backward
gives each rank the gradient of its own rows summed over shards (``∂L/∂f``); rank r's backbone then
holds ``Σ_{i∈r} ∂L/∂f_i · ∂f_i/∂θ`` and DeepSpeed *averages* that over the W ranks, i.e. divides
the global gradient by W. The feature gradient is therefore multiplied by W on its way back
(``_ScaleGrad``, insightface's ``grad_out *= len(grad_list)``), so the averaged backbone gradient
equals the single-process gradient of the same global batch. ``tests/test_sharded_fc.py`` checks
both against a replicated reference through a real DeepSpeed engine.

Memory per rank: the table, its (dense) gradient and optimizer state divide by W; the logits
are (W·B) × ``ceil(sample_rate·C/W)``, i.e. B × sample_rate·C as in the replicated head.
Checkpoints: ``sharded_fc_checkpoint.py`` (one logical table, loadable with any W).
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

# rows per initialisation block: the table's initial values do not depend on the number of ranks
INIT_BLOCK_ROWS = 8192
INIT_STD = 0.01  # as classifier.PartialFC


def distributed(group=None) -> bool:
    """True inside a process group of more than one rank (the collectives below are no-ops otherwise)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def shard_range(num_classes: int, rank: int, world: int) -> tuple[int, int]:
    """Identities ``[lo, hi)`` owned by ``rank`` of ``world`` (as ``PartialFC.class_start``)."""
    return num_classes * rank // world, num_classes * (rank + 1) // world


def _seed(*parts: int) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def init_rows(lo: int, hi: int, dim: int, seed: int) -> torch.Tensor:
    """Initial centres of identities ``[lo, hi)``: N(0, 0.01²), drawn per block of
    ``INIT_BLOCK_ROWS`` identities from a seed of (seed, block), so row c is the same whatever
    shard holds it (a run on 2 ranks starts from the table a run on 1 rank starts from)."""
    out = torch.empty(hi - lo, dim)
    first, last = lo // INIT_BLOCK_ROWS, (hi - 1) // INIT_BLOCK_ROWS if hi > lo else -1
    for block in range(first, last + 1):
        b_lo = block * INIT_BLOCK_ROWS
        g = torch.Generator().manual_seed(_seed(seed, block, dim))
        rows = torch.randn(INIT_BLOCK_ROWS, dim, generator=g) * INIT_STD
        a, b = max(lo, b_lo), min(hi, b_lo + INIT_BLOCK_ROWS)
        out[a - lo:b - lo] = rows[a - b_lo:b - b_lo]
    return out


class _ScaleGrad(torch.autograd.Function):
    """Identity forward; multiplies the gradient by ``factor`` (DeepSpeed's 1/W averaging, undone)."""

    @staticmethod
    def forward(ctx, x, factor):
        ctx.factor = factor
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * ctx.factor, None


class _GatherRows(torch.autograd.Function):
    """All-gather of equal-sized row blocks, rank order. Backward: rank r receives the sum over
    ranks of the gradient of *its* rows (every shard's loss depends on every row)."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group, ctx.rank, ctx.rows = group, dist.get_rank(group), x.shape[0]
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size(group))]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        # all_reduce + slice rather than reduce_scatter: gloo has no reduce_scatter; the volume
        # is the global batch's features (W·B × D), small beside the backbone's gradients
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None


def gather_features(feat: torch.Tensor, group=None) -> torch.Tensor:
    """The global batch's features (W·B × D), differentiable, the gradient scaled for DeepSpeed."""
    if not distributed(group):
        return feat
    world = dist.get_world_size(group)
    return _GatherRows.apply(_ScaleGrad.apply(feat, float(world)), group)


def gather_labels(labels: torch.Tensor, group=None) -> torch.Tensor:
    if not distributed(group):
        return labels
    parts = [torch.empty_like(labels) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, labels.contiguous(), group=group)
    return torch.cat(parts)


def check_same_batch(rows: int, device, group) -> None:
    """Every rank must bring B rows (pad as ``engine.lockstep`` does): the gather needs it."""
    t = torch.tensor([rows, -rows], device=device, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    if int(t[0]) != -int(t[1]):
        raise ValueError(f"sharded Partial FC: ranks have batches of {-int(t[1])}..{int(t[0])} rows (this rank "
                         f"{rows}); every rank needs the same per-worker batch (pad the short one)")


def _all_reduce(t: torch.Tensor, op, group) -> torch.Tensor:
    if distributed(group):
        dist.all_reduce(t, op=op, group=group)
    return t


class _ShardedSoftmaxCE(torch.autograd.Function):
    """Soft-target cross-entropy over columns spread across ranks; (loss, correct) for the batch.

    ``logits`` [R, S]: this shard's S columns for all R rows; ``weights`` [R, S]: the hard
    target distribution's mass on those columns (a one-hot row for the ID head, 1/|P(i)| on each
    positive for CLIP-ReID's supervised contrastive loss; each row sums to 1 over all shards,
    a row with all its mass elsewhere is zero here). The smoothing mass ε is spread over all
    C = Σ S columns, as ``cross_entropy_label_smooth`` does over its C columns:
    ``loss_i = logZ_i - (1-ε)·Σ_c w_ic z_ic - (ε/C)·Σ_c z_ic``. Backward: ``(softmax - q) / R``
    with ``q = (1-ε)·w + ε/C``, this shard's columns only (no collective: every rank holds the
    whole ``logZ``).
    """

    @staticmethod
    def forward(ctx, logits, weights, epsilon, group):
        z = logits if logits.dtype == torch.float64 else logits.float()  # 16-bit logits: softmax in fp32
        w = weights.to(z.dtype)
        rows, cols = z.shape
        m = (z.max(dim=1).values if cols else torch.full((rows,), -torch.inf, dtype=z.dtype, device=z.device)).contiguous()
        _all_reduce(m, dist.ReduceOp.MAX, group)  # a shift, not differentiated (softmax is shift-free)
        e = torch.exp(z - m[:, None])
        stats = torch.cat([torch.stack([e.sum(1), (w * z).sum(1), z.sum(1)], 1).flatten(),
                           torch.tensor([float(cols)], dtype=z.dtype, device=z.device)])
        _all_reduce(stats, dist.ReduceOp.SUM, group)  # one collective for the three sums + the columns
        sum_exp, z_true, sum_z = stats[:-1].view(rows, 3).unbind(1)
        total_cols = float(stats[-1])
        log_z = m + torch.log(sum_exp)
        loss = (log_z - (1.0 - epsilon) * z_true - (epsilon / total_cols) * sum_z).mean()
        # one-hot targets: the true class scores highest over all shards (margin applied)
        correct = z_true >= m
        ctx.save_for_backward(e / sum_exp[:, None], w)
        ctx.epsilon, ctx.total_cols, ctx.dtype = epsilon, total_cols, logits.dtype
        ctx.mark_non_differentiable(correct)
        return loss, correct

    @staticmethod
    def backward(ctx, grad_loss, _grad_correct):
        prob, w = ctx.saved_tensors
        grad = prob - ctx.epsilon / ctx.total_cols - (1.0 - ctx.epsilon) * w
        grad *= grad_loss / prob.shape[0]
        return grad.to(ctx.dtype), None, None, None


def sharded_cross_entropy(logits: torch.Tensor, weights: torch.Tensor, epsilon: float = 0.0,
                          group=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean loss over the R rows, per-row "true column scores highest") of a softmax whose
    columns are split across the ranks of ``group``: ``logits`` and ``weights`` [R, S] are this
    rank's columns (see ``_ShardedSoftmaxCE``). A collective: every rank calls it with the same
    R rows, and gets the same loss. Backward gives this rank's columns their exact gradient;
    with one process it is ``cross_entropy_label_smooth`` (soft targets ``w``)."""
    return _ShardedSoftmaxCE.apply(logits, weights, epsilon, group)


def one_hot_columns(target_col: torch.Tensor, cols: int, dtype=torch.float32) -> torch.Tensor:
    """[R, cols] weights from a true column per row, -1 where another shard holds the true class."""
    w = torch.zeros(target_col.shape[0], cols, dtype=dtype, device=target_col.device)
    rows = (target_col >= 0).nonzero().squeeze(1)
    w[rows, target_col[rows]] = 1.0
    return w


class _SumOverRanks(torch.autograd.Function):
    """All-reduce sum forward, identity backward: every rank reports the global value of a sum
    of per-rank parts, and backward gives each rank the gradient of its own part only (as
    ``_ShardedSoftmaxCE``'s does, so gradients that meet in ``_GatherRows`` sum to the total)."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.clone()
        _all_reduce(x, dist.ReduceOp.SUM, group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def sum_over_ranks(x: torch.Tensor, group=None) -> torch.Tensor:
    """Σ over the ranks of ``x`` (same value everywhere); the gradient of this rank's ``x`` is
    the output's gradient (no W× from an all-reduce in backward)."""
    return _SumOverRanks.apply(x, group) if distributed(group) else x


@dataclass
class HeadOutput:
    """One step of the sharded head: the same ``loss`` and ``accuracy`` on every rank."""

    loss: torch.Tensor  # scalar: mean label-smoothed CE over the global batch
    accuracy: torch.Tensor  # scalar: share of the global batch whose true class scores highest
    columns: int  # centres this shard scored (positives + negatives)
    positives: int  # of which identities of the global batch


class ShardedPartialFC(nn.Module):
    """This rank's shard of a cosine ID head over ``num_classes`` identities.

    ``forward(feat, labels, step)`` is a collective: every rank of ``group`` calls it with the
    same B and the same ``step``. Not a submodule of the DeepSpeed engine's model: build its
    optimizer with ``head_optimizer`` and step it beside the engine.
    """

    def __init__(self, dim: int, num_classes: int, *, sample_rate: float = 0.1, scale: float = 30.0,
                 margin: float = 0.0, label_smoothing: float = 0.1, seed: int = 0, rank: int | None = None,
                 world: int | None = None, group=None):
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate: {sample_rate} is not in (0, 1]")
        if not 0.0 <= label_smoothing < 1.0:
            raise ValueError(f"label_smoothing: {label_smoothing} is not in [0, 1)")
        if rank is None or world is None:
            rank, world = (dist.get_rank(group), dist.get_world_size(group)) if distributed(group) else (0, 1)
        if num_classes < world:
            raise ValueError(f"num_classes: {num_classes} identities cannot be sharded over {world} ranks")
        self.dim, self.num_classes, self.rank, self.world, self.group = dim, num_classes, rank, world, group
        self.lo, self.hi = shard_range(num_classes, rank, world)
        self.num_local = self.hi - self.lo
        self.num_sample = max(1, math.ceil(sample_rate * self.num_local))
        self.sample_rate, self.scale, self.margin = sample_rate, scale, margin
        self.label_smoothing, self.seed = label_smoothing, seed
        # `weight` as in PartialFC: what a class-centre reader (the hard P×K sampler) looks for
        self.weight = nn.Parameter(init_rows(self.lo, self.hi, dim, seed))

    def sample(self, labels: torch.Tensor, step: int) -> tuple[torch.Tensor, int]:
        """(local centre indices, number of positives): the global batch's identities in this
        shard (ascending), then ``num_sample - positives`` others drawn without replacement
        from a generator seeded by (seed, step, lo). All positives are kept when they are more."""
        local = labels - self.lo
        positives = torch.unique(local[(local >= 0) & (local < self.num_local)], sorted=True)
        n_neg = self.num_sample - len(positives)
        if n_neg <= 0:
            return positives, len(positives)
        g = torch.Generator(device=self.weight.device).manual_seed(_seed(self.seed, step, self.lo))
        keys = torch.rand(self.num_local, generator=g, device=self.weight.device)
        keys[positives] = 2.0  # never drawn as negatives
        negatives = torch.topk(keys, n_neg, largest=False, sorted=True).indices
        return torch.cat([positives, negatives]), len(positives)

    def forward(self, feat: torch.Tensor, labels: torch.Tensor, step: int) -> HeadOutput:
        """``feat`` [B, D] this rank's features (the BNNeck output), ``labels`` [B] global identity
        ids in ``[0, num_classes)``, ``step`` the global optimizer step (seeds the negatives)."""
        if feat.ndim != 2 or feat.shape[1] != self.dim or labels.shape != feat.shape[:1]:
            raise ValueError(f"sharded Partial FC: expected feat [B, {self.dim}] and labels [B], got "
                             f"{tuple(feat.shape)} and {tuple(labels.shape)}")
        if distributed(self.group):
            check_same_batch(feat.shape[0], feat.device, self.group)
        x = gather_features(feat, self.group)
        y = gather_labels(labels, self.group)
        idx, n_pos = self.sample(y, step)
        # a dense gradient for the whole shard (index backward): counted by bench/partial_fc_memory.py
        cos = F.normalize(x.float(), dim=1) @ F.normalize(self.weight[idx].float(), dim=1).t()
        here = (y >= self.lo) & (y < self.hi)
        target_col = torch.full_like(y, -1)
        target_col[here] = torch.searchsorted(idx[:n_pos], y[here] - self.lo)
        if self.margin:
            rows = here.nonzero().squeeze(1)
            shift = torch.zeros_like(cos)
            shift[rows, target_col[rows]] = self.margin
            cos = cos - shift
        loss, correct = sharded_cross_entropy(cos * self.scale, one_hot_columns(target_col, cos.shape[1]),
                                              self.label_smoothing, self.group)
        return HeadOutput(loss, correct.float().mean(), len(idx), n_pos)

    def extra_repr(self) -> str:
        return (f"identities [{self.lo}, {self.hi}) of {self.num_classes}, dim {self.dim}, "
                f"rank {self.rank}/{self.world}, {self.num_sample} sampled per step")


def head_optimizer(head: ShardedPartialFC, optimizer: str, lr: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    """The shard's own optimizer (as ``train.engine.make_optimizer`` would build it for the
    centres): no weight decay, since cosine logits ignore the centres' norms and decay would
    rewrite every row each step. ``optimizer``: ``adamw`` | ``adam`` | ``sgd``."""
    params = [head.weight]
    if optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum, weight_decay=0.0)
    if optimizer == "adam":
        return torch.optim.Adam(params, lr=lr, weight_decay=0.0)
    if optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    raise ValueError(f"optimizer: {optimizer!r} is not one of adamw, adam, sgd")


class NeckOutput(nn.Module):
    """A ``ReIDModel.classifier`` that returns its input: with the sharded head outside the
    engine, ``model(images, labels=...)`` yields ``(feat, neck feature, labels)`` and the
    recipe passes the neck feature to ``ShardedPartialFC``."""

    def forward(self, feat: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return feat
