"""Center loss (Wen et al., "A Discriminative Feature Learning Approach for Deep Face
Recognition", ECCV 2016), as used in the ReID "strong baseline" (Luo et al., CVPRW 2019).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class CenterLoss(nn.Module):
    """Pulls each feature towards a learnable centre of its class.

    ``forward(features [N, D], targets [N]) -> scalar L = (1/N) Σ_i ||x_i - c_{y_i}||²``.

    Wen et al. write ``½ Σ_i``; we follow torchreid / the BoT baseline (batch mean, no ½)
    so their published weight (λ = 5e-4) carries over. The centres ``[num_classes, feat_dim]``
    are an ``nn.Parameter`` (initialised ``N(0, 1)`` like torchreid) updated by whatever
    optimizer holds them; BoT gives them their own SGD (lr 0.5) and divides their
    gradient by λ so the centre update does not shrink with the loss weight, which stands
    in for Wen et al.'s separate centre-update rate α.
    """

    def __init__(self, num_classes: int, feat_dim: int):
        super().__init__()
        if num_classes < 1 or feat_dim < 1:
            raise ValueError(f"num_classes and feat_dim must be >= 1, got {num_classes} and {feat_dim}")
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))

    def forward(self, features: Tensor, targets: Tensor) -> Tensor:
        if features.ndim != 2 or features.shape[1] != self.centers.shape[1] or targets.shape != features.shape[:1]:
            raise ValueError(
                f"expected features [N, {self.centers.shape[1]}] and targets [N], "
                f"got {tuple(features.shape)} and {tuple(targets.shape)}"
            )
        # Gathering each sample's own centre costs O(N·D), unlike the [N, C] distance
        # matrix torchreid builds and then masks.
        return (features - self.centers[targets]).pow(2).sum(dim=1).mean()

    def extra_repr(self) -> str:
        return f"num_classes={self.centers.shape[0]}, feat_dim={self.centers.shape[1]}"
