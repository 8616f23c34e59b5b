"""The open-set decision threshold the online service uses: ROC distance threshold -> gallery score.

``jobs/evaluate.py`` finds the distance threshold at a target FAR on the query/gallery pairs
(``verification.threshold_at_far``) and writes it, in the gallery index's own score space, to
``open_set.json`` (evaluation directory and ``<index_dir>/open_set.json``), which the search
service reads to say "unknown identity" when the best hit is not close enough.
"""

from __future__ import annotations

import math

from reidscale.index.metric import GALLERY_METRICS, gallery_metric_for  # noqa: F401 (gallery_metric_for: re-exported)


def score_threshold(distance_threshold: float, eval_metric: str, gallery_metric: str) -> float:
    """The gallery score equivalent to accepting pairs with evaluation distance <= ``distance_threshold``.

    The project's embeddings are L2-normalised (the embedding model and the index job make them
    so), which ties the spaces together for unit vectors u, v:
    cosine distance c = 1 - u.v; squared Euclidean e = |u - v|^2 = 2 - 2 u.v = 2c;
    FAISS ip score s = u.v; FAISS l2 score = squared L2 = e.

    * gallery "ip": a hit is the same identity when s >= threshold; s = 1 - c = 1 - e / 2.
    * gallery "l2": a hit is the same identity when squared L2 <= threshold; = e = 2c.

    A threshold of +inf (accept everything) maps to -inf for ip; -inf (accept nothing) to +inf.
    """
    gallery_metric_for(eval_metric)  # ValueError unless cosine or euclidean
    if gallery_metric not in GALLERY_METRICS:
        raise ValueError(f"gallery_metric must be one of {GALLERY_METRICS}, got {gallery_metric!r}")
    t = float(distance_threshold)
    cosine = t if eval_metric == "cosine" else t / 2.0
    if gallery_metric == "ip":
        return -math.inf if cosine == math.inf else (math.inf if cosine == -math.inf else 1.0 - cosine)
    return 2.0 * cosine
