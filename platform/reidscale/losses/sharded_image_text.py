"""CLIP-ReID's image-text losses with the identities' text side split across ranks.

The replicated losses are in ``image_text.py``; these compute the same values over the
*global* batch (every rank's rows, all-gathered) when each rank holds only the prompts or
text features of its identity range ``[lo, hi)`` (``models/sharded_prompts.py``). The
softmax over identities uses ``sharded_fc.sharded_cross_entropy``: an all-reduce of the row
maxima, then one of the sums of exp, so the loss is exact and the same on every rank.

Gradients. Backward gives each rank the gradient of its own prompt rows (exact: no averaging,
they live outside DeepSpeed) and its share of the image features' gradient; the features'
all-gather sums those shares over ranks and multiplies by W (``sharded_fc.gather_features``),
so after DeepSpeed's 1/W averaging the backbone sees the single-process gradient of the global
batch. A rank's image feature gradient is therefore W × the single-process one (tested).

All are collectives: every rank calls them with the same per-rank batch size B.
``logit_scale`` is a float (CLIP-ReID uses 1): a learnable scale would need its gradient summed
over ranks, which nothing here does. 16-bit features are upcast to float32 (as ``image_text.py``
does), float64 stays float64.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from reidscale.losses.pairs import upcast_half
from reidscale.models.sharded_fc import (check_same_batch, distributed, gather_features, gather_labels,
                                         one_hot_columns, sharded_cross_entropy, sum_over_ranks)


def _gathered(image_features: Tensor, labels: Tensor, group) -> tuple[Tensor, Tensor]:
    if image_features.ndim != 2 or labels.shape != image_features.shape[:1]:
        raise ValueError(f"expected image features [B, D] and labels [B], got {tuple(image_features.shape)} "
                         f"and {tuple(labels.shape)}")
    if distributed(group):
        check_same_batch(image_features.shape[0], image_features.device, group)
    return gather_features(upcast_half(image_features), group), gather_labels(labels, group)


def sharded_supervised_contrastive(image_features: Tensor, labels: Tensor,
                                   text_features_of: Callable[[Tensor], Tensor], lo: int, hi: int,
                                   logit_scale: float = 1.0, group=None) -> tuple[Tensor, Tensor]:
    """(``L_i2t``, ``L_t2i``) of CLIP-ReID stage 1 over the global batch, text side sharded.

    Args:
        image_features: ``[B, D]`` this rank's image features.
        labels: ``[B]`` their global identity ids.
        text_features_of: global ids in ``[lo, hi)`` → their text features ``[n, D]``
            (``Stage1Model`` over a ``ShardedPromptLearner``; differentiable in the prompts).
        lo, hi: this rank's identities.

    Returns ``supervised_contrastive_i2t`` and ``_t2i`` of the all-gathered batch (N = W·B rows,
    text row j = identity y_j's text feature), the same values on every rank. Each rank
    computes the text features of the batch rows whose identity it owns (each such identity
    once): they are its *columns* of the i2t softmax (exact across ranks) and its *rows* of
    the t2i softmax (over the N images every rank holds, so local; the mean is summed over ranks).
    """
    x, y = _gathered(image_features, labels, group)
    n = y.shape[0]
    owned = ((y >= lo) & (y < hi)).nonzero().squeeze(1)  # the batch positions whose text is here
    ids, where = torch.unique(y[owned], return_inverse=True)
    if len(ids):
        t = upcast_half(text_features_of(ids))[where]  # [S, D], row j = identity y[owned[j]]
    else:  # no identity of this range in the batch: no columns, no rows
        t = x.new_zeros(0, x.shape[1])
    same = (y[:, None] == y[owned][None, :]).to(x.dtype)  # [N, S]: image i and text j share the identity
    positives = (y[:, None] == y[None, :]).sum(1).to(x.dtype)  # |P(i)| over the whole global batch
    i2t, _ = sharded_cross_entropy(logit_scale * (x @ t.t()), same / positives[:, None], 0.0, group)
    # t2i: text row j against all N images, P(j) = images of identity y_j (at least the row itself)
    log_prob = F.log_softmax(logit_scale * (t @ x.t()), dim=1)
    pos_t = same.t()
    mine = -((pos_t * log_prob).sum(1) / pos_t.sum(1)).sum()
    t2i = sum_over_ranks(mine, group) / n
    return i2t, t2i


def sharded_i2t_cross_entropy(image_features: Tensor, labels: Tensor, text_rows: Tensor, lo: int,
                              logit_scale: float = 1.0, epsilon: float = 0.1, group=None) -> Tensor:
    """CLIP-ReID stage 2's ``L_i2tce`` over the global batch, this rank holding the (frozen)
    text features of identities ``[lo, lo + len(text_rows))``: ``i2t_cross_entropy`` of the
    all-gathered features against all identities' text features, label smoothing ε spread over
    all C identities, the same value on every rank."""
    x, y = _gathered(image_features, labels, group)
    logits = logit_scale * (x @ text_rows.to(x.device, x.dtype).t())  # [N, C/W]
    local = y - lo
    target_col = torch.where((local >= 0) & (local < text_rows.shape[0]), local, torch.full_like(local, -1))
    loss, _ = sharded_cross_entropy(logits, one_hot_columns(target_col, logits.shape[1]), epsilon, group)
    return loss
