"""Pair-wise circle loss (Sun et al., "Circle Loss: A Unified Perspective of Pair
Similarity Optimization", CVPR 2020, eq. 6 with the pair-wise labels of §3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from reidscale.losses.pairs import check_batch, identity_masks, upcast_half, zero_loss


def circle_loss(features: Tensor, targets: Tensor, m: float = 0.25, gamma: float = 256.0) -> Tensor:
    """Circle loss on cosine similarity of L2-normalised features, averaged over anchors.

    Args:
        features: ``[N, D]`` embeddings; always L2-normalised here (the loss is defined
            on cosine similarity). 16-bit floats are upcast to float32.
        targets: ``[N]`` int64 identity labels.
        m: relaxation margin; optima ``O_p = 1 + m``, ``O_n = -m``, decision margins
            ``Δ_p = 1 - m``, ``Δ_n = m``.
        gamma: scale ``γ`` (the paper uses 256 for face, 128 for person ReID).

    Returns:
        Scalar mean over anchors ``a`` of
        ``softplus( logsumexp_{p} [-γ·α_p·(s_p - Δ_p)] + logsumexp_{n} [γ·α_n·(s_n - Δ_n)] )``
        with ``s`` the cosine similarity to same-identity images ``p ≠ a`` and to
        other-identity images ``n``, and weights ``α_p = relu(O_p - s_p)``,
        ``α_n = relu(s_n - O_n)`` treated as constants (detached), as in the paper and in
        fast-reid's ``pairwise_circleloss``.

    Anchors without a positive or without a negative are left out of the mean (fast-reid
    keeps them in the denominator with a ~0 loss); with at least two identities of at
    least two images each, as in any P×K batch, the two agree. No valid anchor gives an
    exact 0 that still backpropagates.
    """
    check_batch(features, targets)
    x = F.normalize(upcast_half(features), dim=1)
    is_pos, is_neg = identity_masks(targets)
    valid = is_pos.any(dim=1) & is_neg.any(dim=1)
    if not valid.any():
        return zero_loss(x)

    # Only valid rows: a logsumexp over an all -inf row would put NaN into the backward pass.
    sim = x[valid] @ x.t()
    is_pos, is_neg = is_pos[valid], is_neg[valid]
    alpha_p = F.relu(1.0 + m - sim.detach())
    alpha_n = F.relu(sim.detach() + m)
    logit_p = (-gamma * alpha_p * (sim - (1.0 - m))).masked_fill(~is_pos, float("-inf"))
    logit_n = (gamma * alpha_n * (sim - m)).masked_fill(~is_neg, float("-inf"))
    return F.softplus(torch.logsumexp(logit_p, dim=1) + torch.logsumexp(logit_n, dim=1)).mean()
