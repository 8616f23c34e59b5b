"""Helpers shared by the losses: distance matrix, identity masks, input checks."""

from __future__ import annotations

import torch
from torch import Tensor

# Squared distances below this are clamped before sqrt: d/dx sqrt(x) is infinite at 0,
# and duplicate features (or rounding in the Gram formula) give exactly/near 0.
MIN_SQUARED_DISTANCE = 1e-12


def pairwise_euclidean(features: Tensor) -> Tensor:
    """``[N, D] -> [N, N]`` Euclidean distances with finite gradients everywhere.

    Uses ``|a|² + |b|² - 2ab`` (O(N·D) memory, unlike broadcasting ``a - b``), clamped at
    1e-12 before the square root, so identical rows give distance 1e-6 and zero gradient.
    """
    sq_norms = features.pow(2).sum(dim=1)
    squared = sq_norms.unsqueeze(1) + sq_norms.unsqueeze(0) - 2.0 * features @ features.t()
    return squared.clamp(min=MIN_SQUARED_DISTANCE).sqrt()


def identity_masks(targets: Tensor) -> tuple[Tensor, Tensor]:
    """``[N] -> ([N, N], [N, N])`` boolean masks: (same identity without self, different identity)."""
    same = targets.unsqueeze(0) == targets.unsqueeze(1)
    eye = torch.eye(len(targets), dtype=torch.bool, device=targets.device)
    return same & ~eye, ~same


def upcast_half(features: Tensor) -> Tensor:
    """float16/bfloat16 -> float32, other dtypes unchanged.

    Losses lose most of their precision in 16-bit floats (the Gram-matrix distance
    cancels, softmax/logsumexp of scaled similarities saturates), so they compute in
    float32 even under autocast; the gradient flows back in the input's dtype.
    """
    return features.float() if features.dtype in (torch.float16, torch.bfloat16) else features


def check_batch(features: Tensor, targets: Tensor) -> None:
    """Raise ``ValueError`` unless features are ``[N, D]`` and targets ``[N]``."""
    if features.ndim != 2 or targets.shape != features.shape[:1]:
        raise ValueError(
            f"expected features [N, D] and targets [N], got {tuple(features.shape)} and {tuple(targets.shape)}"
        )


def zero_loss(features: Tensor) -> Tensor:
    """An exact scalar 0 that is still connected to ``features``.

    Returned when a batch holds no usable pair or triplet, so ``loss.backward()`` works
    (giving zero gradients) instead of failing on a tensor that does not require grad.
    """
    return (features * 0.0).sum()
