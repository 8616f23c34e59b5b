"""Verification metrics: ROC (FAR, TAR), TAR at a FAR, threshold for a FAR, EER.

A pair is accepted as "same identity" when its distance is <= a threshold.
FAR (false accept rate) = accepted impostor pairs / impostor pairs (different identities);
TAR (true accept rate) = accepted genuine pairs / genuine pairs (same identity).
``roc_curve`` is exact on given pair distances; ``roc_from_features`` scores every
query-gallery pair in bounded memory by counting distances on a fixed grid.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from reidscale.evaluate.metrics import check_inputs, distance_chunks

DEFAULT_FARS = (1e-2, 1e-3, 1e-4)


@dataclass(frozen=True)
class ROC:
    """One point per distinct threshold, ascending; accept a pair when distance <= threshold.

    thresholds[0] is -inf (accept nothing: FAR = TAR = 0); far and tar never decrease and
    end at 1. FAR values below 1 / num_impostor cannot be resolved.
    """

    thresholds: np.ndarray  # (n,) float64 distances
    far: np.ndarray  # (n,) float64
    tar: np.ndarray  # (n,) float64
    num_genuine: int
    num_impostor: int


def _roc_from_counts(thresholds: np.ndarray, genuine: np.ndarray, impostor: np.ndarray) -> ROC:
    """ROC from the number of genuine/impostor pairs whose (quantised) distance is each threshold."""
    n_gen, n_imp = int(genuine.sum()), int(impostor.sum())
    if n_gen == 0 or n_imp == 0:
        raise ValueError(f"need genuine and impostor pairs, got {n_gen} and {n_imp}")
    used = (genuine + impostor) > 0
    return ROC(
        thresholds=np.concatenate([[-np.inf], thresholds[used]]).astype(np.float64),
        far=np.concatenate([[0.0], np.cumsum(impostor[used]) / n_imp]),
        tar=np.concatenate([[0.0], np.cumsum(genuine[used]) / n_gen]),
        num_genuine=n_gen,
        num_impostor=n_imp,
    )


def roc_curve(genuine: np.ndarray, impostor: np.ndarray) -> ROC:
    """Exact ROC from genuine and impostor pair distances (any shapes; flattened).

    Memory is a few copies of the inputs. The points equal sklearn's
    ``roc_curve(labels, -distances, drop_intermediate=False)`` with thresholds negated.
    """
    genuine, impostor = np.ravel(genuine), np.ravel(impostor)
    thresholds, where = np.unique(np.concatenate([genuine, impostor]), return_inverse=True)
    counts = lambda idx: np.bincount(idx, minlength=len(thresholds))
    return _roc_from_counts(thresholds, counts(where[: len(genuine)]), counts(where[len(genuine):]))


def roc_from_features(
    query_features: np.ndarray,
    gallery_features: np.ndarray,
    query_ids: np.ndarray,
    gallery_ids: np.ndarray,
    query_cameras: np.ndarray | None = None,
    gallery_cameras: np.ndarray | None = None,
    *,
    metric: str = "euclidean",
    bins: int = 1 << 16,
    chunk_size: int | None = None,
) -> ROC:
    """ROC over every query-gallery pair, in memory independent of Q×G.

    Pairs and distances are those of ``evaluate_reid`` (same metric formulas; same identity =
    genuine, different = impostor; with cameras, same-identity-same-camera pairs are left out).
    Each distance is rounded UP to a grid of ``bins`` points k*w (w a power of two, so the
    rounding is exact in float32; the last point is +inf), and pairs are counted per point.
    The result is the exact ROC of the rounded distances: at each returned threshold, FAR and
    TAR are exactly those of the unrounded distances; only thresholds between grid points are
    missing. Grid: [0, 2] for cosine, [0, (max |q| + max |g|)^2] for euclidean.
    Peak memory: the features, a float64 copy of the gallery (see ``evaluate_reid``) plus ~3x one
    chunk's distances.
    """
    q, g, q_ids, g_ids, q_cams, g_cams = check_inputs(query_features, gallery_features, query_ids,
                                                      gallery_ids, query_cameras, gallery_cameras, metric)
    if bins < 2:
        raise ValueError(f"bins must be >= 2, got {bins}")
    if metric == "cosine":
        top = 2.0
    else:
        top = float(np.linalg.norm(q, axis=1).max() + np.linalg.norm(g, axis=1).max()) ** 2
    scale = np.float32(2.0 ** -math.ceil(math.log2(max(top, 1e-30) / bins)))  # 1 / w

    genuine = np.zeros(bins + 1, np.int64)
    impostor = np.zeros(bins + 1, np.int64)
    for chunk in distance_chunks(q, g, q_ids, g_ids, q_cams, g_cams, metric, chunk_size):
        # bin k in 1..bins holds distances in ((k-1)w, kw]: multiplying by a power of two is
        # exact, so ceil puts a distance equal to a grid point into that point's bin
        d = chunk.dist
        d *= scale
        np.ceil(d, out=d)
        np.clip(d, 1, bins, out=d)  # below the grid: first point; above it: the last (+inf)
        k = d.astype(np.intp)
        del d
        chunk.dist = None  # frees the float distances before counting
        same_id = k[chunk.rows, chunk.cols]
        genuine += np.bincount(same_id[~chunk.junk], minlength=bins + 1)
        impostor += np.bincount(k.ravel(), minlength=bins + 1) - np.bincount(same_id, minlength=bins + 1)
        del chunk, k
    thresholds = np.arange(bins + 1) / np.float64(scale)
    thresholds[-1] = np.inf
    return _roc_from_counts(thresholds, genuine, impostor)


def _last_at_or_below(roc: ROC, far: float) -> int:
    if not 0 <= far <= 1:
        raise ValueError(f"far must be in [0, 1], got {far}")
    return int(np.searchsorted(roc.far, far, side="right")) - 1  # far[0] = 0, so always >= 0


def tar_at_far(roc: ROC, far: float) -> float:
    """Highest TAR among ROC points whose FAR is <= ``far`` (no interpolation)."""
    return float(roc.tar[_last_at_or_below(roc, far)])


def threshold_at_far(roc: ROC, far: float) -> float:
    """Largest distance threshold whose FAR is <= ``far`` (accept pairs with distance <= it)."""
    return float(roc.thresholds[_last_at_or_below(roc, far)])


def equal_error_rate(roc: ROC) -> tuple[float, float]:
    """(EER, threshold): the rate where FAR equals FRR = 1 - TAR.

    EER is interpolated linearly between the two ROC points around the crossing (the usual
    ``brentq(lambda x: 1 - x - interp(x, far, tar), 0, 1)``); the threshold is that of the
    first point where FAR >= FRR.
    """
    gap = 1.0 - roc.tar - roc.far  # FRR - FAR: 1 at the first point, -1 at the last
    i = int(np.argmax(gap <= 0))
    a = gap[i - 1] / (gap[i - 1] - gap[i])
    return float(roc.far[i - 1] + a * (roc.far[i] - roc.far[i - 1])), float(roc.thresholds[i])


def verification_metrics(roc: ROC, fars: tuple[float, ...] = DEFAULT_FARS) -> dict:
    """Summary for logging: eer, eer_threshold, and tar@far=<f>, threshold@far=<f> for each f."""
    eer, eer_threshold = equal_error_rate(roc)
    out = {"eer": eer, "eer_threshold": eer_threshold,
           "num_genuine": roc.num_genuine, "num_impostor": roc.num_impostor}
    for far in fars:
        out[f"tar@far={far:g}"] = tar_at_far(roc, far)
        out[f"threshold@far={far:g}"] = threshold_at_far(roc, far)
    return out


def pair_distances(
    query_features: np.ndarray,
    gallery_features: np.ndarray,
    query_ids: np.ndarray,
    gallery_ids: np.ndarray,
    query_cameras: np.ndarray | None = None,
    gallery_cameras: np.ndarray | None = None,
    *,
    metric: str = "euclidean",
    max_impostors: int = 200_000,
    seed: int = 0,
    chunk_size: int | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """(genuine distances, a uniform sample of impostor distances, number of impostor pairs).

    The pairs and distances of ``roc_from_features`` (and of ``evaluate_reid``'s ranking):
    genuine = same identity, minus same identity AND same camera when cameras are given (the
    ReID protocol's junk); impostor = different identity. Every genuine distance is returned;
    each impostor is kept with probability ``max_impostors / num_impostor`` (all if fewer), so
    a histogram of them has the impostor distribution's shape.
    """
    q, g, q_ids, g_ids, q_cams, g_cams = check_inputs(query_features, gallery_features, query_ids,
                                                      gallery_ids, query_cameras, gallery_cameras, metric)
    ids, counts = np.unique(g_ids, return_counts=True)
    pos = np.clip(np.searchsorted(ids, q_ids), 0, len(ids) - 1)
    same_per_query = np.where(ids[pos] == q_ids, counts[pos], 0)
    num_impostor = int(len(q) * len(g) - same_per_query.sum())
    keep = min(1.0, max_impostors / max(num_impostor, 1))
    rng = np.random.default_rng(seed)
    genuine, impostor = [], []
    for chunk in distance_chunks(q, g, q_ids, g_ids, q_cams, g_cams, metric, chunk_size):
        d = chunk.dist
        genuine.append(d[chunk.rows[~chunk.junk], chunk.cols[~chunk.junk]])
        d[chunk.rows, chunk.cols] = np.nan  # same identity: not an impostor pair
        flat = d.ravel()
        imp = flat[~np.isnan(flat)]
        impostor.append(imp[rng.random(len(imp)) < keep] if keep < 1 else imp)
        del chunk, d, flat
    return np.concatenate(genuine), np.concatenate(impostor), num_impostor
