"""Batch-hard triplet loss (Hermans, Beyer & Leibe, "In Defense of the Triplet Loss for
Person Re-Identification", arXiv:1703.07737, 2017).

Every image of a P×K batch is an anchor; its triplet uses the farthest same-identity
image and the closest other-identity image in the batch.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from reidscale.losses.pairs import check_batch, identity_masks, pairwise_euclidean, upcast_half, zero_loss


def triplet_batch_hard(
    features: Tensor,
    targets: Tensor,
    margin: float = 0.3,
    soft_margin: bool = False,
    normalize_features: bool = False,
) -> Tensor:
    """Batch-hard triplet loss on Euclidean distance, averaged over anchors.

    Args:
        features: ``[N, D]`` embeddings; half precision is upcast to float32 because the
            Gram-matrix distance cancels catastrophically in 16-bit floats.
        targets: ``[N]`` int64 identity labels.
        margin: hinge margin ``m``; ignored when ``soft_margin`` is set.
        soft_margin: use ``softplus(d_p - d_n)`` instead of the hinge (Hermans et al. §3).
        normalize_features: L2-normalise features first (distances then lie in [0, 2]).

    Returns:
        Scalar ``L = (1/|A|) Σ_{a∈A} relu(d_p(a) - d_n(a) + m)`` (or ``softplus(d_p - d_n)``),
        where ``d_p(a) = max_{p: y_p = y_a, p ≠ a} d(a, p)`` and
        ``d_n(a) = min_{n: y_n ≠ y_a} d(a, n)``.

    Anchors without a positive (a singleton identity) or without a negative (a
    single-identity batch) define no triplet, so they are left out of the set ``A`` the
    mean runs over (as pytorch-metric-learning's BatchHardMiner does), rather than
    counted with ``d_p = 0`` as torchreid/fast-reid do by including self as positive. If no
    anchor is valid the loss is an exact 0 that still backpropagates (zero gradients).
    """
    check_batch(features, targets)
    x = upcast_half(features)
    if normalize_features:
        x = F.normalize(x, dim=1)
    is_pos, is_neg = identity_masks(targets)
    valid = is_pos.any(dim=1) & is_neg.any(dim=1)
    if not valid.any():
        return zero_loss(x)

    dist = pairwise_euclidean(x)[valid]
    is_pos, is_neg = is_pos[valid], is_neg[valid]
    # Masked entries are ±inf so they never win the max/min; every kept row has a finite one.
    hardest_pos = dist.masked_fill(~is_pos, float("-inf")).amax(dim=1)
    hardest_neg = dist.masked_fill(~is_neg, float("inf")).amin(dim=1)
    if soft_margin:
        return F.softplus(hardest_pos - hardest_neg).mean()
    return F.relu(hardest_pos - hardest_neg + margin).mean()
