"""Image-text losses of CLIP-ReID (Li, Sun & Li, "CLIP-ReID: Exploiting Vision-Language
Model for Image Re-identification without Concrete Text Labels", AAAI 2023).

Stage 1 learns one text prompt per identity with a supervised contrastive loss between
a batch's image features and the text features of the same images' identities (both
directions). Stage 2 freezes those text features and trains the image encoder with a
cross-entropy of each image against every identity's text feature.

Features are used as given: CLIP-ReID passes the unnormalised projected features with
``logit_scale = 1``; CLIP-style training passes L2-normalised features and
``logit_scale = model.logit_scale.exp()``. ``logit_scale`` may be a tensor that requires
grad. 16-bit features are upcast to float32 before the similarity matrix.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from reidscale.losses.classification import cross_entropy_label_smooth
from reidscale.losses.pairs import upcast_half


def _supervised_contrastive(anchors: Tensor, contrast: Tensor, targets: Tensor, logit_scale: float | Tensor) -> Tensor:
    """``-(1/N) Σ_i (1/|P(i)|) Σ_{j∈P(i)} log softmax_j(s · a_i·c_j)``, ``P(i) = {j : y_j = y_i}``.

    ``contrast[j]`` belongs to identity ``targets[j]``, so ``P(i)`` always holds ``j = i``
    and is never empty.
    """
    if anchors.ndim != 2 or anchors.shape != contrast.shape or targets.shape != anchors.shape[:1]:
        raise ValueError(
            "expected image and text features [N, D] and targets [N], got "
            f"{tuple(anchors.shape)}, {tuple(contrast.shape)} and {tuple(targets.shape)}"
        )
    log_prob = F.log_softmax(logit_scale * (upcast_half(anchors) @ upcast_half(contrast).t()), dim=1)
    positive = (targets.unsqueeze(1) == targets.unsqueeze(0)).to(log_prob.dtype)
    return -((positive * log_prob).sum(dim=1) / positive.sum(dim=1)).mean()


def supervised_contrastive_i2t(
    image_features: Tensor, text_features: Tensor, targets: Tensor, logit_scale: float | Tensor
) -> Tensor:
    """Image-to-text supervised contrastive loss (CLIP-ReID stage 1, ``L_i2t``).

    Args:
        image_features: ``[N, D]`` image features of the batch.
        text_features: ``[N, D]``; row ``j`` is the text feature of identity ``targets[j]``
            (so identities with K images in the batch appear K times).
        targets: ``[N]`` int64 identity labels.
        logit_scale: ``s``, the inverse temperature.

    Returns:
        Scalar ``L_i2t = -(1/N) Σ_i (1/|P(i)|) Σ_{p∈P(i)} log( exp(s·v_i·t_p) / Σ_j exp(s·v_i·t_j) )``,
        ``P(i) = {p : y_p = y_i}``: each image is classified over the batch's texts, with
        every text of its own identity a positive. Equals CLIP-ReID's
        ``SupConLoss(image_features, text_features, targets, targets)`` when ``s = 1``.
    """
    return _supervised_contrastive(image_features, text_features, targets, logit_scale)


def supervised_contrastive_t2i(
    image_features: Tensor, text_features: Tensor, targets: Tensor, logit_scale: float | Tensor
) -> Tensor:
    """Text-to-image supervised contrastive loss (CLIP-ReID stage 1, ``L_t2i``).

    Same arguments as :func:`supervised_contrastive_i2t`, with the roles swapped:
    ``L_t2i = -(1/N) Σ_i (1/|P(i)|) Σ_{p∈P(i)} log( exp(s·t_i·v_p) / Σ_j exp(s·t_i·v_j) )``.
    Stage 1 minimises ``L_i2t + L_t2i``.
    """
    return _supervised_contrastive(text_features, image_features, targets, logit_scale)


def i2t_cross_entropy(
    image_features: Tensor,
    text_features_all_ids: Tensor,
    targets: Tensor,
    logit_scale: float | Tensor,
    epsilon: float = 0.1,
) -> Tensor:
    """Image-to-text cross-entropy over all identities (CLIP-ReID stage 2, ``L_i2tce``).

    Args:
        image_features: ``[N, D]`` image features.
        text_features_all_ids: ``[C, D]``; row ``c`` is identity ``c``'s text feature
            (computed once per stage-2 run and usually detached).
        targets: ``[N]`` int64 identity labels in ``[0, C)``.
        logit_scale: ``s``, the inverse temperature.
        epsilon: label smoothing, as in :func:`cross_entropy_label_smooth`; CLIP-ReID
            uses 0.1 (its ``IF_LABELSMOOTH: on``), ``0`` is plain cross-entropy.

    Returns:
        Scalar ``cross_entropy_label_smooth(s · V Tᵀ, targets, epsilon)``: ``-(1/N) Σ_i Σ_c
        q_ic log softmax_c(s · v_i·t_c)`` with ``q = (1 - ε)·onehot + ε / C``.
    """
    if (
        image_features.ndim != 2
        or text_features_all_ids.ndim != 2
        or image_features.shape[1] != text_features_all_ids.shape[1]
    ):
        raise ValueError(
            "expected image features [N, D] and text features [C, D], got "
            f"{tuple(image_features.shape)} and {tuple(text_features_all_ids.shape)}"
        )
    logits = logit_scale * (upcast_half(image_features) @ upcast_half(text_features_all_ids).t())
    return cross_entropy_label_smooth(logits, targets, epsilon)
