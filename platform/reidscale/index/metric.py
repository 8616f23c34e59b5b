"""The two gallery metrics, their FAISS constants and the evaluation distances they match.

A gallery scores with FAISS's ``ip`` (inner product: larger is closer) or ``l2`` (squared
L2: smaller is closer). The project's vectors are L2-normalised, so ``ip`` ranks as the
evaluation's ``cosine`` distance and ``l2`` as its (squared) ``euclidean`` distance; this
module is the one place those pairings are written down.
"""

from __future__ import annotations

GALLERY_METRICS = ("ip", "l2")
# gallery metric -> the evaluation distance that ranks the same way (and back)
EVAL_METRIC = {"ip": "cosine", "l2": "euclidean"}
GALLERY_METRIC = {v: k for k, v in EVAL_METRIC.items()}


def check_gallery_metric(metric: str) -> str:
    """``metric`` if it is a gallery metric; ValueError listing the choices otherwise."""
    if metric not in GALLERY_METRICS:
        raise ValueError(f"metric {metric!r} is not one of {', '.join(GALLERY_METRICS)}")
    return metric


def faiss_metric(metric: str) -> int:
    """``faiss.METRIC_INNER_PRODUCT`` for "ip", ``faiss.METRIC_L2`` for "l2"."""
    import faiss

    return {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}[check_gallery_metric(metric)]


def larger_is_closer(metric: str) -> bool:
    """Whether a larger score is a closer match (ip similarity) rather than a smaller one (l2 distance)."""
    return check_gallery_metric(metric) == "ip"


def eval_metric_for(gallery_metric: str) -> str:
    """The evaluation distance ("cosine"/"euclidean") a gallery metric ranks like."""
    return EVAL_METRIC[check_gallery_metric(gallery_metric)]


def gallery_metric_for(eval_metric: str) -> str:
    """The gallery metric ("ip"/"l2") that ranks like an evaluation distance."""
    if eval_metric not in GALLERY_METRIC:
        raise ValueError(f"eval_metric must be cosine or euclidean, got {eval_metric!r}")
    return GALLERY_METRIC[eval_metric]
