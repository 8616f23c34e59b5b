"""ID classifiers: the plain linear one, and Partial FC for up to millions of identities.

Partial FC (An et al., "Partial FC: Training 10 Million Identities on a Single Machine",
ICCVW 2021): each step scores the batch only against the class centres of the identities in
the batch (positives) plus a random subset of the others (negatives), ``sample_rate`` r of
all centres; logits are cosine similarities × ``scale``, with an optional additive (CosFace)
``margin`` on the true class. The loss is ordinary cross-entropy over the sampled columns.

Protocol (see ``ReIDModel.forward``): called with labels, the columns are the sampled
centres, the batch's identities first in ascending order, so a sample's target column is
the rank of its label among the batch's distinct labels (``sampled_targets``). Called
without labels (validation, the class-centre export), the logits cover every class in
order and the targets are the labels themselves.

Training (``reid.build_classifier``, one DeepSpeed data-parallel engine per worker) keeps
every centre on every worker (rank 0 of world 1) and samples per step on each worker: the
engine's gradient all-reduce then averages whole-table gradients of identical tables, which
is correct. A sharded table would not be: the all-reduce would average rows of different
classes.

Sharding the centres by rank (not done in training; the structure is ready for it): rank k of W
keeps the rows ``[k·C/W, (k+1)·C/W)`` (``class_start``/``num_local``); features and labels
of the global batch are all-gathered; each rank samples positives that fall in its shard
plus r·C/W negatives, scores the global batch against them, and the softmax denominator is
an all-reduce (max, then sum of exponentials) over ranks; the feature gradient is
all-reduced back. The shard is model-parallel: it must stay out of the data-parallel
gradient all-reduce (its own optimizer, or DeepSpeed's ``ds`` ignore list). Per-worker
memory then divides by W for the centres, their gradient and optimizer state, and by 1/r
for the logits (``memory_bytes`` below does the arithmetic).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LinearClassifier(nn.Linear):
    """The BoT classifier: a bias-free linear layer, weights N(0, 0.001²). Labels are not needed."""

    def __init__(self, dim: int, num_classes: int):
        super().__init__(dim, num_classes, bias=False)
        nn.init.normal_(self.weight, std=0.001)

    def forward(self, feat: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        return super().forward(feat)


def sampled_targets(labels: torch.Tensor) -> torch.Tensor:
    """Target column of each sample in Partial FC's logits: its label's rank among the batch's
    distinct labels (the positives come first, ascending)."""
    return torch.unique(labels, sorted=True, return_inverse=True)[1]


class PartialFC(nn.Module):
    """Cosine classifier over ``num_classes`` centres, scoring a sampled subset in training."""

    def __init__(self, dim: int, num_classes: int, *, sample_rate: float = 0.1, scale: float = 30.0,
                 margin: float = 0.0, rank: int = 0, world: int = 1):
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate: {sample_rate} is not in (0, 1]")
        self.num_classes = num_classes
        self.class_start = num_classes * rank // world
        self.num_local = num_classes * (rank + 1) // world - self.class_start
        self.num_sample = max(1, math.ceil(sample_rate * self.num_local))
        self.scale, self.margin = scale, margin
        # `weight` (not `centres`): the P×K sampler's hard mode reads classifier.weight as class centres
        self.weight = nn.Parameter(torch.randn(self.num_local, dim) * 0.01)

    def sample(self, labels: torch.Tensor) -> torch.Tensor:
        """Local centre indices: the batch's identities (ascending) then random others, at least
        ``num_sample`` in all (all positives are kept even when they are more)."""
        positives = torch.unique(labels - self.class_start, sorted=True)
        positives = positives[(positives >= 0) & (positives < self.num_local)]
        n_neg = self.num_sample - len(positives)
        if n_neg <= 0:
            return positives
        # uniform without replacement among the non-positives: random keys, positives pushed last
        keys = torch.rand(self.num_local, device=self.weight.device)
        keys[positives] = 2.0
        negatives = torch.topk(keys, n_neg, largest=False, sorted=False).indices
        return torch.cat([positives, negatives])

    def forward(self, feat: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Scaled cosine logits: N × sampled centres with labels (targets: ``sampled_targets``),
        N × all classes without (targets: the labels)."""
        if labels is None:
            weight, targets = self.weight, None
        else:
            weight = self.weight[self.sample(labels)]
            targets = sampled_targets(labels)
        cos = F.normalize(feat.float(), dim=1) @ F.normalize(weight.float(), dim=1).t()
        if self.margin and labels is not None:
            cos = cos - self.margin * F.one_hot(targets, cos.shape[1]).to(cos.dtype)
        return (cos * self.scale).to(feat.dtype)


def memory_bytes(num_classes: int, dim: int, batch: int, *, sample_rate: float = 1.0, world: int = 1,
                 optimizer_states: int = 2, bytes_per_value: int = 4) -> dict[str, int]:
    """Per-worker bytes of a classifier's tensors (fp32 by default; AdamW keeps 2 states).

    ``sample_rate`` < 1 with ``world`` > 1 is Partial FC with centres sharded over ``world``
    ranks, each scoring the *global* batch (``batch`` × ``world``) against its sampled centres.
    ``sample_rate`` = 1 and ``world`` = 1 is the plain full classifier (replicated on each
    data-parallel worker). The dense gradient of the centres is counted in full (autograd
    materialises it for the whole local table).
    """
    local = math.ceil(num_classes / world)
    sampled = max(1, math.ceil(sample_rate * local)) if sample_rate < 1 else local
    rows = batch * world if world > 1 else batch
    table = local * dim * bytes_per_value
    return {
        "centres": table,
        "gradient": table,
        "optimizer_state": optimizer_states * table,
        "sampled_centres": sampled * dim * bytes_per_value * 2 if sample_rate < 1 else 0,  # gather + normalised copy
        "logits": rows * sampled * bytes_per_value * 3,  # logits, softmax, their gradient
    }
