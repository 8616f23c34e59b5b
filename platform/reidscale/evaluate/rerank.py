"""k-reciprocal re-ranking (Zhong et al., CVPR 2017), from top-k neighbourhoods in bounded memory.

"Re-ranking Person Re-identification with k-reciprocal Encoding". Queries and gallery form one
set of N = Q + G items. Each item i gets a sparse encoding V[i]: weights exp(-d(i, j)) over its
k1-reciprocal neighbours j, expanded by the half-size (round(k1/2)) reciprocal sets of those
neighbours, normalised to sum 1; then averaged over its k2 nearest items (query expansion). The
re-ranked distance of query q to gallery item g is

    (1 - lambda) * jaccard(V[q], V[g]) + lambda * d(q, g),
    jaccard(a, b) = 1 - sum(min(a, b)) / sum(max(a, b)),

with d divided by each row's largest distance over all N items. The result equals the authors'
dense ``re_ranking(q_g_dist, q_q_dist, g_g_dist, k1, k2, lambda_value)`` (torchreid ships it),
but no N×N matrix exists: one chunked BLAS pass finds every item's k1 + 1 nearest items and
its largest distance; V has at most ~1.5 k1 nonzeros a row (a few k1 after query expansion);
Jaccard overlaps are summed only over the items that share a nonzero with a query.

Distances d: "euclidean" is the squared Euclidean distance, as in the paper and the authors'
code (which squares the Euclidean distances it is given; torchreid's engine hands it squared
distances, so it squares twice, a steeper weighting than the paper's). "cosine" is 1 - cosine
similarity, half the squared Euclidean distance of L2-normalised features; the per-row
scaling cancels the half, so it re-ranks like "euclidean" on normalised features.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from reidscale.evaluate.metrics import (CHUNK_BYTES, MAX_CHUNK_ROWS, check_inputs, distance_block,
                                        distance_chunks, find_duplicates, query_scores, rank_true_matches,
                                        squared_norms, summarise)

K1, K2, LAMBDA = 20, 6, 0.3  # as in the paper, torchreid and fast-reid
CANDIDATES = 200  # rerank()'s list length per query


def check_params(k1: int, k2: int, lambda_value: float, candidates: int | None, num_items: int | None = None):
    """ValueError naming the parameter when one is out of range."""
    for name, v in (("k1", k1), ("k2", k2)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
            raise ValueError(f"{name} must be an integer, got {v!r}")
    if k1 < 1:
        raise ValueError(f"k1 must be >= 1, got {k1}")
    if not 1 <= k2 <= k1:
        raise ValueError(f"k2 must be in [1, k1={k1}], got {k2}")
    if not 0.0 <= lambda_value <= 1.0:
        raise ValueError(f"lambda_value must be in [0, 1], got {lambda_value}")
    if candidates is not None and (isinstance(candidates, bool) or candidates < 1):
        raise ValueError(f"candidates must be >= 1 or None (the whole gallery), got {candidates!r}")
    if num_items is not None and k1 + 1 > num_items:
        raise ValueError(f"k1 must be < the number of query + gallery items ({num_items}), got {k1}")


def _rows_per_chunk(n_cols: int, chunk_size: int | None) -> int:
    return chunk_size or max(1, min(MAX_CHUNK_ROWS, CHUNK_BYTES // (4 * max(n_cols, 1))))


def smallest(d: np.ndarray, k: int) -> np.ndarray:
    """(rows, k) column indices of each row's k smallest entries, in (value, column) order.

    Ties are broken by column index, as a stable argsort would, so a candidate list is exactly a
    prefix of the stable order. Only entries no larger than a bound on each row's k-th value are
    sorted: the k-th smallest over any k or more of the row's columns bounds it from above, and
    over an evenly strided sample of ~32 k of them it is tight enough, at a fraction of the cost
    of partitioning whole rows (the selection then costs less than the distances).
    """
    if 4 * k >= d.shape[1]:  # most of the row: a plain sort is cheaper than selecting
        return np.argsort(d, axis=1, kind="stable")[:, :k]
    stride = max(1, d.shape[1] // max(32 * k, 4096))
    kth = np.partition(d[:, ::stride], k - 1, axis=1)[:, k - 1]
    rows, cols = np.nonzero(d <= kth[:, None])
    order = np.lexsort((cols, d[rows, cols], rows))
    start = np.searchsorted(rows[order], np.arange(len(d)))
    return cols[order][start[:, None] + np.arange(k)]


def nearest_items(x: np.ndarray, sq: np.ndarray | None, k: int, metric: str, chunk_size: int | None = None):
    """(nbrs (N, k) int64, row_max (N,) float32) over the rows of x, in one chunked pass.

    nbrs[i]: the k nearest rows to row i (itself first, barring duplicates), (distance, index)
    order; row_max[i]: its largest distance to any row. x is prepared for ``distance_block``
    (normalised for cosine), sq its squared row norms for euclidean. Peak memory ~3 chunks of
    ``chunk_size`` x N float32.
    """
    nbrs, row_max = np.empty((len(x), k), np.int64), np.empty(len(x), np.float32)
    step = _rows_per_chunk(len(x), chunk_size)
    duplicates = find_duplicates(x)
    for lo in range(0, len(x), step):
        d = distance_block(x[lo : lo + step], x, metric, None if sq is None else sq[lo : lo + step], sq, duplicates)
        row_max[lo : lo + step] = d.max(axis=1)
        nbrs[lo : lo + step] = smallest(d, k)
        del d
    return nbrs, row_max


def pair_distances(x: np.ndarray, sq: np.ndarray | None, rows: np.ndarray, cols: np.ndarray, metric: str):
    """float32 d(x[rows[p]], x[cols[p]]) per pair, with ``distance_block``'s formula (sq: squared norms)."""
    out = np.empty(len(rows), np.float32)
    step = max(256, (4 << 20) // (8 * x.shape[1]))  # pairs per step: ~4 MB of gathered float64 rows each side
    for lo in range(0, len(rows), step):
        i, j = rows[lo : lo + step], cols[lo : lo + step]
        dot = np.einsum("ij,ij->i", x[i].astype(np.float64), x[j].astype(np.float64))
        out[lo : lo + step] = 1.0 - dot if metric == "cosine" else (-2.0 * dot + sq[j]) + sq[i]  # float64, rounded once
    return out


def reciprocal(nbrs: np.ndarray, k: int, chunk: int = 2048) -> np.ndarray:
    """bool (N, k + 1): is nbrs[i, r] a k-reciprocal neighbour of i (i among its k + 1 nearest)?"""
    out = np.empty((len(nbrs), k + 1), bool)
    for lo in range(0, len(nbrs), chunk):
        f = nbrs[lo : lo + chunk, : k + 1]
        own = np.arange(lo, lo + len(f))[:, None, None]
        out[lo : lo + chunk] = (nbrs[f, : k + 1] == own).any(axis=-1)
    return out


def encodings(x: np.ndarray, sq: np.ndarray | None, nbrs: np.ndarray, row_max: np.ndarray, k1: int, metric: str,
              chunk: int = 1024) -> CSR:
    """V (N, N) float32: the k-reciprocal encodings before query expansion (rows sum to 1).

    Row i's support: R(i), the k1-reciprocal neighbours of i, plus R_half(c) for each c in R(i)
    that shares more than 2/3 of its round(k1/2)-reciprocal set R_half(c) with R(i).
    """
    kh = int(np.around(k1 / 2.0))  # the authors' rounding: half to even, as numpy does
    rec, half = reciprocal(nbrs, k1), reciprocal(nbrs, kh)
    half_size = half.sum(axis=1)
    n = len(nbrs)
    indptr, indices = [np.zeros(1, np.int64)], []
    for lo in range(0, n, chunk):
        r, m = nbrs[lo : lo + chunk, : k1 + 1], rec[lo : lo + chunk]  # (c, k1+1): R(i) where m
        h, hm = nbrs[r, : kh + 1], half[r]  # (c, k1+1, kh+1): R_half(c) for each c = r[i, j]
        in_rec = ((h[..., None] == r[:, None, None, :]) & m[:, None, None, :]).any(axis=-1) & hm
        # the same float comparison as the authors' `len(...) > 2. / 3 * len(...)`
        accept = m & (in_rec.sum(axis=-1) > 2.0 / 3 * half_size[r])
        members = np.concatenate([np.where(m, r, n), np.where(accept[..., None] & hm, h, n).reshape(len(r), -1)],
                                 axis=1)
        members.sort(axis=1)
        keep = members < n
        keep[:, 1:] &= members[:, 1:] != members[:, :-1]  # each item once
        indptr.append(keep.sum(axis=1))
        indices.append(members[keep])
    indptr = np.cumsum(np.concatenate(indptr))
    indices = np.concatenate(indices)
    rows = np.repeat(np.arange(n), np.diff(indptr))
    weight = np.exp(-(pair_distances(x, sq, rows, indices, metric) / row_max[rows]))
    # a row is empty only if more than k1 duplicates of an item precede it; it stays zero
    weight = (weight / np.bincount(rows, weights=weight, minlength=n)[rows]).astype(np.float32)
    return CSR(indptr, indices, weight)


@dataclass
class CSR:
    """A sparse matrix by rows (scipy's CSR layout): row i is indices/data[indptr[i]:indptr[i + 1]]."""

    indptr: np.ndarray  # (rows + 1,) int64
    indices: np.ndarray  # column of each entry, ascending inside a row
    data: np.ndarray  # float32

    @staticmethod
    def from_entries(rows, cols, values, n_rows: int) -> "CSR":
        """Entries in any order; duplicates (same row and column) are summed."""
        order = np.lexsort((cols, rows))
        rows, cols, values = rows[order], cols[order], values[order]
        first = np.flatnonzero(np.r_[True, (rows[1:] != rows[:-1]) | (cols[1:] != cols[:-1])]) if len(rows) else rows
        data = np.add.reduceat(values, first) if len(rows) else values
        return CSR(np.searchsorted(rows[first], np.arange(n_rows + 1)), cols[first], data)

    def row_of_entry(self) -> np.ndarray:
        return np.repeat(np.arange(len(self.indptr) - 1), np.diff(self.indptr))

    def gather(self, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The entries of the given rows (repeats allowed): (which of ``rows``, column, value)."""
        length = self.indptr[rows + 1] - self.indptr[rows]
        at = np.repeat(self.indptr[rows] - np.cumsum(length) + length, length) + np.arange(length.sum())
        return np.repeat(np.arange(len(rows)), length), self.indices[at], self.data[at]

    def transpose(self, n_cols: int) -> "CSR":
        order = np.argsort(self.indices, kind="stable")  # keeps rows ascending inside a column
        return CSR(np.searchsorted(self.indices[order], np.arange(n_cols + 1)), self.row_of_entry()[order],
                   self.data[order])


@dataclass
class Encodings:
    """Query-expanded k-reciprocal encodings of queries (rows 0..Q-1) then gallery (Q..N-1)."""

    v: CSR  # (N, N) float32, rows sum to 1
    by_column: CSR  # v transposed: for a neighbour, the items whose encoding holds it
    row_max: np.ndarray  # (N,) float32: each item's largest distance to any item, d's row scale
    num_queries: int


def k_reciprocal_encodings(query_features: np.ndarray, gallery_features: np.ndarray, *, metric: str = "euclidean",
                           k1: int = K1, k2: int = K2, chunk_size: int | None = None) -> Encodings:
    """Encodings of the Q + G items (features float32; for cosine L2-normalised here).

    Cost: one pass of (Q+G)^2 distances in chunks of ``chunk_size`` rows (default within 256 MB),
    plus O((Q+G) k1^3) integer work for the reciprocal tests. Memory: O((Q+G) k1 k2) for V.
    """
    check_params(k1, k2, 0.0, None, len(query_features) + len(gallery_features))
    x = np.concatenate([query_features, gallery_features]).astype(np.float32, copy=False)
    if metric == "cosine":
        x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n, sq = len(x), squared_norms(x) if metric == "euclidean" else None
    nbrs, row_max = nearest_items(x, sq, k1 + 1, metric, chunk_size)
    v = encodings(x, sq, nbrs, row_max, k1, metric)
    if k2 > 1:  # the authors skip the expansion for k2 = 1 (it would give V[nearest], not V)
        parts, step = [], max(1, (1 << 22) // (k2 * 4 * k1))  # rows per block: a few million entries
        for lo in range(0, n, step):
            src = nbrs[lo : lo + step, :k2].ravel()
            which, cols, values = v.gather(src)
            part = CSR.from_entries(which // k2, cols, values, len(src) // k2)
            part.data /= np.float32(k2)  # the mean of the k2 rows
            parts.append(part)
        v = CSR(np.cumsum(np.r_[0, np.concatenate([np.diff(p.indptr) for p in parts])]),
                np.concatenate([p.indices for p in parts]), np.concatenate([p.data for p in parts]))
    return Encodings(v, v.transpose(n), row_max, len(query_features))


def overlaps(enc: Encodings, lo: int, hi: int) -> CSR:
    """(hi - lo, G): sum over neighbours f of min(V[q, f], V[Q + g, f]) for queries lo..hi-1.

    Only the pairs that share a neighbour are stored; for all others the Jaccard distance is 1.
    """
    q_row, f, a = enc.v.gather(np.arange(lo, hi))
    which, item, b = enc.by_column.gather(f)  # the items whose encoding holds f, and their weight
    keep = item >= enc.num_queries
    return CSR.from_entries(q_row[which[keep]], item[keep] - enc.num_queries,
                            np.minimum(a[which[keep]], b[keep]), hi - lo)


def rerank_block(enc: Encodings, dist: np.ndarray, lo: int, candidates: int | None, lambda_value: float,
                 jaccard_rows: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """(cand, rr), both (c, M): queries lo..lo+c-1's top-M gallery items under ``dist`` (their
    (c, G) original distances, ties by index), in gallery index order, and their re-ranked
    distances; a stable argsort of rr then gives the re-ranked order, ties by index."""
    n_gallery = dist.shape[1]
    m = n_gallery if candidates is None else min(candidates, n_gallery)
    whole = m == n_gallery
    cand = np.broadcast_to(np.arange(n_gallery), dist.shape) if whole else np.sort(smallest(dist, m), axis=1)
    rows = np.arange(len(dist))[:, None]
    d_norm = (dist if whole else dist[rows, cand]) / enc.row_max[lo : lo + len(dist), None]
    s = np.zeros(cand.shape, np.float32)
    for a in range(0, len(dist), jaccard_rows):
        ov = overlaps(enc, lo + a, lo + min(a + jaccard_rows, len(dist)))
        if whole:  # every pair is a candidate: scatter the overlaps
            s[a + ov.row_of_entry(), ov.indices] = ov.data
            continue
        c = cand[a : a + jaccard_rows]
        # look each (query, candidate) pair up among the sorted nonzeros of its row
        key = ov.row_of_entry() * n_gallery + ov.indices
        want = (np.arange(len(c))[:, None] * n_gallery + c).ravel()
        found = np.zeros(len(want), np.float32)
        if len(key):
            at = np.minimum(np.searchsorted(key, want), len(key) - 1)
            hit = key[at] == want
            found[hit] = ov.data[at[hit]]
        s[a : a + jaccard_rows] = found.reshape(c.shape)
    jaccard = np.float32(1) - s / (np.float32(2) - s)  # sum(max) = 2 - sum(min): rows sum to 1
    return cand, jaccard * np.float32(1 - lambda_value) + d_norm * np.float32(lambda_value)


def rerank(query_features: np.ndarray, gallery_features: np.ndarray, *, metric: str = "euclidean",
           k1: int = K1, k2: int = K2, lambda_value: float = LAMBDA, candidates: int | None = CANDIDATES,
           chunk_size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Re-ranked top-M gallery lists: (indices (Q, M) int64, distances (Q, M) float32), best first.

    For each query the M = min(candidates, G) gallery items closest under ``metric`` (ties by
    gallery index) are re-ordered by their re-ranked distance (ties by gallery index); None
    takes the whole gallery, the authors' dense result, at Q x G output memory. Items beyond
    the M keep their original order after them (see ``evaluate_reid_reranked``).

    Raises:
        ValueError naming the parameter for k1 < 1, k2 outside [1, k1], lambda_value outside
        [0, 1], candidates < 1, k1 >= Q + G, mismatched feature shapes or non-finite features.
    """
    q, g = _features(query_features, gallery_features, metric)
    check_params(k1, k2, lambda_value, candidates, len(q) + len(g))
    enc = k_reciprocal_encodings(q, g, metric=metric, k1=k1, k2=k2, chunk_size=chunk_size)
    if metric == "cosine":
        q, g = q / np.linalg.norm(q, axis=1, keepdims=True), g / np.linalg.norm(g, axis=1, keepdims=True)
    q_sq, g_sq = squared_norms(q), squared_norms(g)
    duplicates = find_duplicates(g)
    indices, distances = [], []
    step = _rows_per_chunk(len(g), chunk_size)
    for lo in range(0, len(q), step):
        dist = distance_block(q[lo : lo + step], g, metric, q_sq[lo : lo + step], g_sq, duplicates)
        cand, rr = rerank_block(enc, dist, lo, candidates, lambda_value)
        del dist
        order = np.argsort(rr, axis=1, kind="stable")  # cand is in index order: ties by index
        indices.append(np.take_along_axis(cand, order, 1))
        distances.append(np.take_along_axis(rr, order, 1))
    return np.concatenate(indices), np.concatenate(distances)


def _features(query_features, gallery_features, metric):
    q = np.asarray(query_features, dtype=np.float32)
    g = np.asarray(gallery_features, dtype=np.float32)
    # shapes, metric, and NaN/inf (all-zero for cosine) rows named by side
    check_inputs(q, g, np.zeros(len(q)), np.zeros(len(g)), None, None, metric)
    return q, g


def evaluate_reid_reranked(
    query_features: np.ndarray,
    gallery_features: np.ndarray,
    query_ids: np.ndarray,
    gallery_ids: np.ndarray,
    query_cameras: np.ndarray | None = None,
    gallery_cameras: np.ndarray | None = None,
    *,
    metric: str = "euclidean",
    max_rank: int = 50,
    k1: int = K1,
    k2: int = K2,
    lambda_value: float = LAMBDA,
    candidates: int | None = None,
    chunk_size: int | None = None,
) -> dict:
    """CMC, mAP, mINP (``evaluate_reid``'s Market-1501 protocol) of the re-ranked gallery order.

    Order per query: its M = min(candidates, G) closest gallery items under ``metric`` (ties by
    gallery index; junk items count towards the M), sorted by re-ranked distance (ties by gallery
    index), then every other gallery item in its original (distance, index) order. The candidates
    are a prefix of the original order, so an item outside them keeps its original rank exactly.
    Then, as in ``evaluate_reid``: same identity + same camera entries are removed, queries with no
    true match are skipped, and AP runs over ALL true matches, inside the candidates or not. With
    candidates=None (the default, or >= G) this is the evaluation of the authors' dense re-ranked
    matrix, the figure papers report; a short list lowers mAP wherever true matches lie beyond it
    (bench/rerank_speed.py: 0.83 at M=200 against 0.97 for the whole gallery), for ~2/3 the time.

    Memory: the encodings (O((Q+G) k1 k2)) plus ``evaluate_reid``'s chunk of Q x G distances;
    no (Q+G) x (Q+G) matrix. Cost: the (Q+G)^2 distance pass of ``k_reciprocal_encodings``.

    Returns:
        {"cmc": float64 (max_rank,), "mAP", "mINP", "num_valid_queries"}, as ``evaluate_reid``.
    """
    q, g = _features(query_features, gallery_features, metric)
    q, g, q_ids, g_ids, q_cams, g_cams = check_inputs(q, g, query_ids, gallery_ids, query_cameras,
                                                      gallery_cameras, metric)
    check_params(k1, k2, lambda_value, candidates, len(q) + len(g))
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    enc = k_reciprocal_encodings(q, g, metric=metric, k1=k1, k2=k2, chunk_size=chunk_size)

    per_query = []
    for chunk in distance_chunks(q, g, q_ids, g_ids, q_cams, g_cams, metric, chunk_size):
        rows, ranks = rank_true_matches(chunk)  # original ranks, junk removed
        cand, rr = rerank_block(enc, chunk.dist, chunk.start, candidates, lambda_value)
        here = slice(chunk.start, chunk.start + len(cand))
        del chunk  # frees the distances before the next chunk is computed
        order = np.argsort(rr, axis=1, kind="stable")  # re-ranked order; cand is in index order
        cand = np.take_along_axis(cand, order, 1)
        same = g_ids[cand] == q_ids[here, None]
        junk = same & (g_cams[cand] == q_cams[here, None]) if q_cams is not None else np.zeros_like(same)
        new_rank = np.cumsum(~junk, axis=1) - 1  # rank among the kept candidates
        n_kept = (~junk).sum(axis=1)
        # a true match outside the candidates comes after all n_kept of them: its rank stands
        outside = ranks >= n_kept[rows]
        r_in, c_in = np.nonzero(same & ~junk)
        rows = np.concatenate([r_in, rows[outside]])
        ranks = np.concatenate([new_rank[r_in, c_in], ranks[outside]])
        o = np.lexsort((ranks, rows))
        per_query.append(query_scores(rows[o], ranks[o]))
    return summarise(per_query, max_rank)
