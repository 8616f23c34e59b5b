"""Re-identification ranking metrics (CMC, mAP, mINP): exact, in bounded memory.

The protocol is Market-1501's as implemented by torchreid's ``eval_market1501``. Results
equal a dense evaluation (full Q×G distance matrix, ``np.argsort(kind="stable")`` per row)
computed with the same distance formula (float64 products rounded once to float32, see
``distance_block``), but only ``chunk_size`` query rows of distances exist at a time and no
gallery row is ever fully sorted. Identical gallery vectors always tie, whatever the BLAS
kernel and the chunking; NaN/inf rows (all-zero rows for cosine) are refused, naming them.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Iterator

import numpy as np

METRICS = ("euclidean", "cosine")

# Default query rows per chunk: as many as keep one chunk of float32 distances within 256 MB
# (the boolean mask beside it adds 25%), at most 1024. BLAS needs some 64 rows to run at full
# speed (fewer halve it at a 1M gallery); more than ~1000 bring nothing.
CHUNK_BYTES, MAX_CHUNK_ROWS = 256 << 20, 1024


def bad_rows(x: np.ndarray, side: str, metric: str) -> None:
    """ValueError naming the first rows (and how many) of ``x`` that are NaN/inf, or all zero
    for cosine (no direction: a distance to them is undefined, and ranking them anywhere, as a
    NaN sorts last, silently changes mAP). ``side`` names the array in the message."""
    finite = np.isfinite(x).all(axis=1)
    bad, what = np.flatnonzero(~finite), "non-finite (NaN/inf)"
    if not len(bad) and metric == "cosine":
        bad, what = np.flatnonzero(~x.any(axis=1)), "all-zero (no direction for cosine)"
    if len(bad):
        shown = ", ".join(str(int(i)) for i in bad[:5]) + (", ..." if len(bad) > 5 else "")
        raise ValueError(f"{side} features: {len(bad)} {what} row(s) of {len(x)}, e.g. row(s) {shown}; "
                         "refusing to rank them")


def check_inputs(query_features, gallery_features, query_ids, gallery_ids, query_cameras,
                 gallery_cameras, metric: str):
    """The six arrays as numpy (features float32), or ValueError naming what is wrong."""
    q = np.asarray(query_features, dtype=np.float32)
    g = np.asarray(gallery_features, dtype=np.float32)
    q_ids, g_ids = np.asarray(query_ids), np.asarray(gallery_ids)
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}")
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise ValueError(f"features must be (Q, D) and (G, D), got {q.shape} and {g.shape}")
    bad_rows(q, "query", metric)
    bad_rows(g, "gallery", metric)
    if q_ids.shape != (len(q),) or g_ids.shape != (len(g),):
        raise ValueError("query_ids/gallery_ids must have one entry per feature row")
    if (query_cameras is None) != (gallery_cameras is None):
        raise ValueError("give both query_cameras and gallery_cameras, or neither")
    if query_cameras is None:
        return q, g, q_ids, g_ids, None, None
    q_cams, g_cams = np.asarray(query_cameras), np.asarray(gallery_cameras)
    if q_cams.shape != q_ids.shape or g_cams.shape != g_ids.shape:
        raise ValueError("camera arrays must have one entry per feature row")
    return q, g, q_ids, g_ids, q_cams, g_cams


def squared_norms(x: np.ndarray, chunk: int = 1 << 14) -> np.ndarray:
    """float64 ``(x * x).sum(axis=1)`` of float32 rows, in chunks (no float64 copy of all of x).

    numpy sums each row on its own (pairwise), so a row's value depends only on the row.
    """
    out = np.empty(len(x), np.float64)
    for lo in range(0, len(x), chunk):
        x64 = np.asarray(x[lo : lo + chunk], dtype=np.float64)
        out[lo : lo + chunk] = (x64 * x64).sum(axis=1)
    return out


@dataclass
class Duplicates:
    """Gallery columns that are bitwise copies of an earlier column: ``cols[i]`` equals ``first[i]``."""

    cols: np.ndarray
    first: np.ndarray


def find_duplicates(g: np.ndarray, chunk: int = 1 << 14) -> Duplicates | None:
    """Bitwise-identical rows of ``g`` (float32) and the first row each copies, or None.

    Rows are hashed with integer arithmetic only (no BLAS, so the grouping cannot depend on
    the kernel), and every candidate is then compared bit for bit with the first row of its
    hash group: a collision never makes two different rows tie (it could only leave copies of a
    colliding row untied, at odds of ~2**-64 per pair of distinct rows).
    """
    if len(g) < 2:
        return None
    bits = np.ascontiguousarray(g).view(np.uint32)
    mult = np.random.default_rng(0x5EED).integers(1, 2**63, g.shape[1], dtype=np.uint64) | np.uint64(1)
    h = np.empty(len(g), np.uint64)
    for lo in range(0, len(g), chunk):  # chunks: no uint64 copy of the whole gallery
        h[lo : lo + chunk] = (bits[lo : lo + chunk].astype(np.uint64) * mult).sum(axis=1)  # wraps mod 2**64
    order = np.argsort(h, kind="stable")  # equal hashes grouped, index order inside a group
    hs = h[order]
    same_as_prev = np.r_[False, hs[1:] == hs[:-1]]
    if not same_as_prev.any():
        return None
    group_start = np.maximum.accumulate(np.where(~same_as_prev, np.arange(len(hs)), 0))
    cand, first = order[same_as_prev], order[group_start[same_as_prev]]
    equal = np.empty(len(cand), bool)
    for lo in range(0, len(cand), chunk):  # bitwise comparison (so -0.0 != 0.0 and NaN payloads count)
        c, f = cand[lo : lo + chunk], first[lo : lo + chunk]
        equal[lo : lo + chunk] = (bits[c] == bits[f]).all(axis=1)
    if not equal.any():
        return None
    return Duplicates(cand[equal], first[equal])


# A float64 copy of the gallery is kept when it takes at most this much (1M x 512-d: 4 GiB);
# above it, distance_block converts blocks of rows for every chunk of queries.
GALLERY_FLOAT64_BYTES = 4 << 30


def prepared_gallery(g: np.ndarray, normalise: bool, chunk: int = 1 << 14) -> np.ndarray:
    """The gallery as ``distance_block`` reads it: L2-normalised in float32 (``x / norm(x)``) for
    cosine, then as one float64 copy when it fits GALLERY_FLOAT64_BYTES. Why the copy: at a 1M
    gallery a chunk holds only ~64 query rows, and converting the whole gallery to float64 for
    each of them made the distances ~5x the float32 GEMM; converted once, ~2x. Built block by
    block, so no float32 normalised copy of the whole gallery exists beside it."""
    as64 = g.size * 8 <= GALLERY_FLOAT64_BYTES
    if not (as64 or normalise):
        return g
    out = np.empty(g.shape, np.float64 if as64 else np.float32)
    for lo in range(0, len(g), chunk):
        x = g[lo : lo + chunk]
        out[lo : lo + chunk] = x / np.linalg.norm(x, axis=1, keepdims=True) if normalise else x
    return out


# Gallery rows converted to float64 at a time inside distance_block (~64 MB)
GALLERY_BLOCK_BYTES = 64 << 20


def distance_block(q: np.ndarray, g: np.ndarray, metric: str, q_sq=None, g_sq=None,
                   duplicates: Duplicates | None = None) -> np.ndarray:
    """float32 distances (len(q), len(g)): float64 arithmetic, rounded once to float32.

    cosine: ``1 - q @ g.T``; the caller has L2-normalised the rows as ``x / norm(x, axis=1)``.
    euclidean: squared Euclidean distance (torchreid ranks by it), ``(-2 * (q @ g.T) + g_sq) + q_sq``
    with ``x_sq = squared_norms(x)`` (float64).

    Why float64: float32 GEMM kernels round a dot product differently depending on where the
    row sits in the matrix product (OpenBLAS's Haswell kernels do, for every chunk size), so
    bitwise-identical gallery rows got distances one ulp apart and ties, and thus ranks,
    depended on the BLAS kernel and on chunking. float64 accumulation errors are ~2**-29 of a
    float32 ulp, so rounding to float32 almost never sees them; ``duplicates`` (from
    ``find_duplicates``) then copies each duplicate row's column from its first copy, which
    makes exact duplicates tie whatever the kernel. Cost: about 2x the float32 matmul
    (docs/benchmarks.md, "Evaluation speed").
    """
    q = np.asarray(q, dtype=np.float64)
    single = len(q) == 1
    if single:  # a single row would go to gemv: keep every call on gemm
        q = np.concatenate([q, q])
    out = np.empty((len(q), len(g)), np.float32)
    # float64 temporaries per gallery block: at most ~64 MB of converted rows and at most a
    # quarter of the float32 result (an eighth of the rows, at twice the bytes), >= 1024 rows
    # so each product stays large enough for BLAS to run at full speed
    step = max(1, min(GALLERY_BLOCK_BYTES // (8 * max(g.shape[1], 1)), max(1024, -(-len(g) // 8))))
    for lo in range(0, len(g), step):
        d = q @ np.asarray(g[lo : lo + step], dtype=np.float64).T  # no copy for a float64 gallery
        if metric == "cosine":
            np.subtract(1.0, d, out=d)
        else:
            d *= -2.0
            d += g_sq[None, lo : lo + step]
            d += q_sq[:, None]  # one entry for a single (doubled) row broadcasts
        out[:, lo : lo + step] = d  # the one rounding to float32
        del d
    if duplicates is not None:
        out[:, duplicates.cols] = out[:, duplicates.first]
    return out[:1] if single else out


@dataclass
class Chunk:
    """Distances from a run of queries to the whole gallery, and their same-identity pairs."""

    start: int  # index of the chunk's first query
    dist: np.ndarray  # (c, G) float32
    rows: np.ndarray  # same-identity pairs: query row in the chunk, grouped, ascending
    cols: np.ndarray  # ... and gallery index, ascending inside a row
    junk: np.ndarray  # bool per pair: also the same camera, so excluded from evaluation


def distance_chunks(q, g, q_ids, g_ids, q_cams, g_cams, metric: str,
                    chunk_size: int | None = None) -> Iterator[Chunk]:
    """Chunks of query rows with their distances to the whole gallery (see ``distance_block``).

    Features must have passed ``check_inputs``; cosine normalises copies of them here, and the
    gallery is copied to float64 when it fits (``prepared_gallery``).
    """
    q_sq = g_sq = None
    duplicates = find_duplicates(g)
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
    else:
        q_sq, g_sq = squared_norms(q), squared_norms(g)
    g = prepared_gallery(g, normalise=metric == "cosine")
    # Gallery rows grouped by identity, index order kept inside a group (stable), so the
    # same-identity pairs of a query are one searchsorted away.
    id_order = np.argsort(g_ids, kind="stable")
    sorted_ids = g_ids[id_order]
    step = chunk_size or max(1, min(MAX_CHUNK_ROWS, CHUNK_BYTES // (4 * max(len(g), 1))))
    for lo in range(0, len(q), step):
        ids = q_ids[lo : lo + step]
        first = np.searchsorted(sorted_ids, ids, side="left")
        counts = np.searchsorted(sorted_ids, ids, side="right") - first
        rows = np.repeat(np.arange(len(ids)), counts)
        run_start = np.cumsum(counts) - counts  # where each row's pairs start in the pair list
        cols = id_order[np.repeat(first - run_start, counts) + np.arange(counts.sum())]
        junk = (np.zeros(len(rows), bool) if q_cams is None
                else g_cams[cols] == q_cams[lo : lo + step][rows])
        q_sq_chunk = None if q_sq is None else q_sq[lo : lo + step]
        # no local name for the distances: the caller's del then frees them before the next chunk
        yield Chunk(lo, distance_block(q[lo : lo + step], g, metric, q_sq_chunk, g_sq, duplicates), rows, cols, junk)


def _count_before(match_d, match_key, match_rank, d, cols, n_gallery):
    """For entries (d, cols) of one row: how many of the row's true matches rank before each.

    match_d: the matches' distances, sorted by (distance, gallery index); match_key and
    match_rank: see ``rank_true_matches``. A match comes first if closer, or equally close
    with a smaller gallery index (stable argsort's tie rule).
    """
    before = np.searchsorted(match_d, d, side="left")  # strictly closer matches
    tied = np.flatnonzero(np.take(match_d, before, mode="clip") == d)
    if len(tied):  # equal distance to a match: count the tied matches with a smaller index
        before[tied] = np.searchsorted(match_key, match_rank[before[tied]] * (n_gallery + 1) + cols[tied])
    return before


def rank_true_matches(chunk: Chunk) -> tuple[np.ndarray, np.ndarray]:
    """(rows, ranks) of every true match in a chunk, grouped by row, ranks ascending in a row.

    rank = 0-based position in the row's stable ascending sort, junk removed: the number of
    non-junk entries with a smaller distance, or an equal one and a smaller gallery index.
    No row is sorted: entries farther than the row's last true match cannot come before a
    match (one vectorised comparison drops them); each remaining one is placed among the
    row's few sorted matches by binary search, and counts per gap give the ranks.
    """
    dist = chunk.dist
    n_rows, n_gallery = dist.shape
    keep = ~chunk.junk
    rows, cols = chunk.rows[keep], chunk.cols[keep]
    d = dist[rows, cols]
    if np.isnan(d).any():
        raise ValueError("features give NaN distances; check them for NaN/inf")
    order = np.lexsort((cols, d, rows))  # matches in rank order inside each row
    rows, cols, d = rows[order], cols[order], d[order]
    # an integer key ordered like (distance, gallery index) inside a row, to break exact ties
    rank_of_d = np.cumsum(np.r_[True, d[1:] != d[:-1]])  # grows with d inside each row
    key = rank_of_d * (n_gallery + 1) + cols
    start = np.searchsorted(rows, np.arange(n_rows + 1))  # row r's matches: start[r]:start[r+1]
    has_match = start[1:] > start[:-1]
    last = np.full(n_rows, -np.inf, np.float32)
    last[has_match] = d[start[1:][has_match] - 1]

    candidate = dist <= last[:, None]  # may come before a match (NaN never does, as in argsort)
    candidate[chunk.rows[chunk.junk], chunk.cols[chunk.junk]] = False  # junk takes no rank
    flat = np.flatnonzero(candidate)  # row-major: one slice per row, matches included
    del candidate
    c_start = np.searchsorted(flat, np.arange(n_rows + 1) * n_gallery)
    c_d = dist.ravel()[flat]

    ranks = np.empty(len(rows), np.int64)
    for r in np.flatnonzero(has_match):
        m, c = slice(start[r], start[r + 1]), slice(c_start[r], c_start[r + 1])
        n = start[r + 1] - start[r]
        before = _count_before(d[m], key[m], rank_of_d[m], c_d[c], flat[c] - r * n_gallery, n_gallery)
        # candidates ranked up to and including each match, less the match itself
        ranks[m] = np.cumsum(np.bincount(before, minlength=n)[:n]) - 1
    return rows, ranks


def evaluate_reid(
    query_features: np.ndarray,
    gallery_features: np.ndarray,
    query_ids: np.ndarray,
    gallery_ids: np.ndarray,
    query_cameras: np.ndarray | None = None,
    gallery_cameras: np.ndarray | None = None,
    *,
    metric: str = "euclidean",
    max_rank: int = 50,
    chunk_size: int | None = None,
) -> dict:
    """CMC, mAP and mINP of ranking the gallery for each query (Market-1501 protocol).

    Args:
        query_features: (Q, D); gallery_features: (G, D); cast to float32.
        query_ids, gallery_ids: (Q,), (G,) identity labels.
        query_cameras, gallery_cameras: (Q,), (G,) camera labels, or both None (no camera filter).
        metric: "euclidean" (squared Euclidean distance) or "cosine" (1 - cosine similarity;
            features are L2-normalised here). Exact float32 formulas: ``distance_block``.
        max_rank: length of the returned CMC curve.
        chunk_size: query rows per chunk; default keeps a chunk's distances within 256 MB.

    Exactness: the result equals a dense evaluation (full distance matrix, stable argsort per
    row) that uses the same distances (float64 products rounded to float32), ties included.
    Bitwise-identical gallery rows get bitwise-identical distances, so they tie and keep
    gallery index order whatever the BLAS kernel and ``chunk_size``; other distances can
    differ between kernels or chunkings only where a float64 rounding error (~1e-16) straddles
    a float32 rounding boundary, which reorders only entries equal to float32 precision.

    Cost: the Q×G×D matmul, plus a binary search among a query's true matches for every gallery
    entry no farther than its last true match (few for a good model, most of G for a useless
    one). Peak memory: the features, a float64 copy of the gallery (2x its float32 bytes, while
    that is <= 4 GiB; for cosine a normalised copy of the queries too) plus ~1.3x one chunk's distances, up to
    ~4x when nearly every entry comes before the last true match.

    Protocol, per query (torchreid ``eval_market1501``):
        1. Gallery entries with the query's identity AND camera are removed (same-view shots).
        2. The rest is ranked by ascending float32 distance; equal distances keep gallery index
           order (as a stable argsort does).
        3. A query with no true match (same identity) left is skipped.
        4. AP = mean over its n true matches i = 0..n-1, in rank order, of (i + 1) / (rank_i + 1),
           rank_i 0-based; all true matches count, not only those within max_rank.
        5. INP = n / (rank_last + 1), rank_last the rank of the hardest (last) true match
           (Ye et al., "Deep Learning for Person Re-identification: A Survey and Outlook").
    cmc[k] = fraction of kept queries whose first true match has rank <= k (rank-(k+1)
    accuracy); mAP, mINP = means over kept queries. If max_rank exceeds the gallery size a
    warning is issued and the curve keeps its requested length, its tail repeating the last
    reachable value 1.0 (torchreid instead shortens the curve to the gallery size).

    Returns:
        {"cmc": float64 array (max_rank,), "mAP": float, "mINP": float, "num_valid_queries": int}

    Raises:
        ValueError on mismatched shapes, an unknown metric, NaN/inf feature rows (all-zero rows
        too for cosine; the message names the side and the rows), or when no query has a true
        match.
    """
    q, g, q_ids, g_ids, q_cams, g_cams = check_inputs(query_features, gallery_features, query_ids,
                                                      gallery_ids, query_cameras, gallery_cameras, metric)
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    if max_rank > len(g):
        warnings.warn(f"max_rank={max_rank} exceeds the gallery size {len(g)}; the CMC tail "
                      "repeats its last value", stacklevel=2)

    per_query = []
    for chunk in distance_chunks(q, g, q_ids, g_ids, q_cams, g_cams, metric, chunk_size):
        rows, ranks = rank_true_matches(chunk)
        del chunk  # frees the distances before the next chunk is computed
        per_query.append(query_scores(rows, ranks))
    return summarise(per_query, max_rank)


def query_scores(rows: np.ndarray, ranks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(first-match rank, AP, INP) per query from its true matches' 0-based ranks.

    ``rows``/``ranks``: one entry per true match, sorted by row then rank (rank_true_matches's
    output); queries with no entry are absent from the result (skipped by the protocol).
    """
    if len(rows) == 0:
        return np.zeros(0, np.int64), np.zeros(0), np.zeros(0)
    _, start, n = np.unique(rows, return_index=True, return_counts=True)
    i = np.arange(len(rows)) - np.repeat(start, n)  # i-th true match of its row
    ap = np.add.reduceat((i + 1) / (ranks + 1.0), start) / n
    return ranks[start], ap, n / (ranks[start + n - 1] + 1.0)


def summarise(per_query: list[tuple[np.ndarray, np.ndarray, np.ndarray]], max_rank: int) -> dict:
    """evaluate_reid's result dict from the ``query_scores`` of every chunk."""
    first_rank = np.concatenate([p[0] for p in per_query]) if per_query else np.zeros(0, np.int64)
    if not len(first_rank):
        raise ValueError("no query has a true match in the gallery (after the camera filter)")
    ap = np.concatenate([p[1] for p in per_query])
    inp = np.concatenate([p[2] for p in per_query])
    hits = np.bincount(np.minimum(first_rank, max_rank), minlength=max_rank + 1)[:max_rank]
    return {
        "cmc": np.cumsum(hits) / len(first_rank),
        "mAP": float(ap.mean()),
        "mINP": float(inp.mean()),
        "num_valid_queries": int(len(first_rank)),
    }
