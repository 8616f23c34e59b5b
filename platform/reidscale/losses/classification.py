"""Identity classification loss: cross-entropy with label smoothing.

Label smoothing regularises the ID classifier so it does not become over-confident on
the training identities, which never reappear at test time (Szegedy et al., "Rethinking
the Inception Architecture", CVPR 2016; used for ReID by Luo et al., "Bag of Tricks and
a Strong Baseline for Deep Person Re-identification", CVPRW 2019).
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from reidscale.losses.pairs import upcast_half


def cross_entropy_label_smooth(logits: Tensor, targets: Tensor, epsilon: float = 0.1) -> Tensor:
    """Cross-entropy against smoothed one-hot targets, averaged over the batch.

    Args:
        logits: ``[N, C]`` unnormalised class scores (16-bit floats are upcast to float32).
        targets: ``[N]`` int64 class indices in ``[0, C)``.
        epsilon: smoothing mass in ``[0, 1)``; ``0`` is plain cross-entropy.

    Returns:
        Scalar ``L = -(1/N) Σ_i Σ_c q_ic · log softmax(logits_i)_c`` with
        ``q_ic = (1 - ε)·[c = y_i] + ε / C``, i.e. torchreid's ``CrossEntropyLabelSmooth``
        (and the same value as ``F.cross_entropy(..., label_smoothing=ε)``).
    """
    if logits.ndim != 2 or targets.shape != logits.shape[:1]:
        raise ValueError(
            f"expected logits [N, C] and targets [N], got {tuple(logits.shape)} and {tuple(targets.shape)}"
        )
    if not 0.0 <= epsilon < 1.0:
        raise ValueError(f"epsilon must be in [0, 1), got {epsilon}")
    num_classes = logits.shape[1]
    log_probs = F.log_softmax(upcast_half(logits), dim=1)
    # Σ_c q_c log p_c split into the one-hot part and the uniform part avoids building q.
    nll = -log_probs.gather(1, targets.unsqueeze(1)).squeeze(1)
    uniform = -log_probs.sum(dim=1) / num_classes
    return ((1.0 - epsilon) * nll + epsilon * uniform).mean()
