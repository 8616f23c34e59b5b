"""Evaluation: ReID ranking metrics, k-reciprocal re-ranking, verification (ROC) metrics and plots; numpy/scipy/
matplotlib, no Ray."""

from reidscale.evaluate.metrics import evaluate_reid
from reidscale.evaluate.rerank import evaluate_reid_reranked, k_reciprocal_encodings, rerank
from reidscale.evaluate.plots import plot_cmc, plot_distance_histograms, plot_roc
from reidscale.evaluate.verification import (
    ROC,
    equal_error_rate,
    roc_curve,
    roc_from_features,
    tar_at_far,
    threshold_at_far,
    verification_metrics,
)

__all__ = [
    "ROC",
    "equal_error_rate",
    "evaluate_reid",
    "evaluate_reid_reranked",
    "k_reciprocal_encodings",
    "plot_cmc",
    "plot_distance_histograms",
    "plot_roc",
    "rerank",
    "roc_curve",
    "roc_from_features",
    "tar_at_far",
    "threshold_at_far",
    "verification_metrics",
]
