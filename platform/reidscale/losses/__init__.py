"""Loss functions for ReID training: pure functions of tensors, plus one tiny module.

Each loss returns a scalar; the trainer weights and sums the terms its config turns on.
"""

from reidscale.losses.center import CenterLoss
from reidscale.losses.circle import circle_loss
from reidscale.losses.classification import cross_entropy_label_smooth
from reidscale.losses.contrastive import contrastive_loss
from reidscale.losses.image_text import i2t_cross_entropy, supervised_contrastive_i2t, supervised_contrastive_t2i
from reidscale.losses.pairs import identity_masks, pairwise_euclidean
from reidscale.losses.triplet import triplet_batch_hard

__all__ = [
    "CenterLoss",
    "circle_loss",
    "contrastive_loss",
    "cross_entropy_label_smooth",
    "i2t_cross_entropy",
    "identity_masks",
    "pairwise_euclidean",
    "supervised_contrastive_i2t",
    "supervised_contrastive_t2i",
    "triplet_batch_hard",
]
