"""Pairwise contrastive loss (Hadsell, Chopra & LeCun, "Dimensionality Reduction by
Learning an Invariant Mapping", CVPR 2006), over every pair in the batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from reidscale.losses.pairs import check_batch, pairwise_euclidean, upcast_half, zero_loss


def contrastive_loss(
    features: Tensor,
    targets: Tensor,
    margin: float = 1.0,
    normalize_features: bool = True,
) -> Tensor:
    """Hadsell et al.'s contrastive loss on Euclidean distance, averaged over all pairs.

    Args:
        features: ``[N, D]`` embeddings (16-bit floats are upcast to float32).
        targets: ``[N]`` int64 identity labels.
        margin: ``m``; different-identity pairs closer than ``m`` are pushed apart.
        normalize_features: L2-normalise first (the default), so ``d ∈ [0, 2]`` and
            ``d² = 2 - 2·cos``: the margin then means the same thing for any backbone, and
            ``m = 1`` asks negatives for cosine similarity below 0.5.

    Returns:
        Scalar ``L = (1/|P|) Σ_{(i,j)∈P} [y_i = y_j]·d_ij² + [y_i ≠ y_j]·relu(m - d_ij)²``,
        ``P`` = all unordered pairs ``i < j``, ``d`` = Euclidean distance. This is Hadsell
        et al.'s eq. 4 without its ½ factors (as in fast-reid's ``contrastive_loss``), on
        every pair of the batch instead of given siamese pairs. A batch of one image has
        no pair and gives an exact 0 that still backpropagates.
    """
    check_batch(features, targets)
    x = upcast_half(features)
    if normalize_features:
        x = F.normalize(x, dim=1)
    n = len(targets)
    if n < 2:
        return zero_loss(x)
    dist = pairwise_euclidean(x)
    upper = torch.triu(torch.ones(n, n, dtype=torch.bool, device=x.device), diagonal=1)
    same = (targets.unsqueeze(0) == targets.unsqueeze(1))[upper]
    d = dist[upper]
    per_pair = torch.where(same, d.pow(2), F.relu(margin - d).pow(2))
    return per_pair.mean()
