"""Top-k arithmetic over per-shard hits, shared by every holder of shards.

``Gallery`` (threads in one process) and ``index.distributed`` (shard actors across nodes)
both search each shard, drop its tombstoned rows with ``live_hits``, and merge in manifest
shard order with ``merge_topk`` inside ``search_live``; ``top_identities`` builds the distinct-
identity answer on any of them. The same functions on the same shards: the same answer.
"""

from __future__ import annotations

import numpy as np

from reidscale.index.metric import larger_is_closer
from reidscale.index.vectors import check_vectors


def merge_topk(scores: list[np.ndarray], ids: list[np.ndarray], k: int, larger_is_better: bool) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (Q×k_s) results into global top-k; FAISS pads missing hits with id -1."""
    all_scores = np.concatenate(scores, axis=1)
    all_ids = np.concatenate(ids, axis=1)
    key = -all_scores if larger_is_better else all_scores.copy()
    key = np.where(all_ids < 0, np.inf, key)
    order = np.argsort(key, axis=1, kind="stable")[:, :k]
    out_scores = np.take_along_axis(all_scores, order, 1)
    out_ids = np.take_along_axis(all_ids, order, 1)
    pad = -np.inf if larger_is_better else np.inf
    out_scores[out_ids < 0] = pad
    return out_scores, out_ids


def live_hits(scores: np.ndarray, ids: np.ndarray, removed: np.ndarray, larger_is_better: bool
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One shard's Q×k hits without its ``removed`` (sorted) row ids: (scores, ids, more).

    Live hits keep their order and move up; the freed places pad with id -1. ``more``
    (Q bools): the shard filled all k places, so a deeper search may find more live rows.
    Every holder of shards applies the tombstones this way (``Gallery`` here, each shard
    actor of ``index.distributed``), so both return the same hits.
    """
    more = ids[:, -1] >= 0 if ids.shape[1] else np.zeros(len(ids), bool)
    if not len(removed):
        return scores, ids, more
    pos = np.clip(np.searchsorted(removed, ids), 0, len(removed) - 1)
    live = (ids >= 0) & (removed[pos] != ids)
    order = np.argsort(~live, axis=1, kind="stable")
    live = np.take_along_axis(live, order, 1)
    ids = np.where(live, np.take_along_axis(ids, order, 1), -1)
    scores = np.where(live, np.take_along_axis(scores, order, 1), -np.inf if larger_is_better else np.inf)
    return scores.astype(np.float32, copy=False), ids, more


def search_live(search_shards, num_removed: int, queries: np.ndarray, k: int, larger_is_better: bool
                ) -> tuple[np.ndarray, np.ndarray]:
    """Top-k live hits over all shards: ``search_shards(queries, fetch)`` returns each shard's
    ``live_hits`` (a list, in manifest shard order); rows that lost too many hits to the
    ``num_removed`` tombstones are searched again, deeper. Exact for Flat; for approximate
    indexes the index's own ranking of the live rows."""
    pad = -np.inf if larger_is_better else np.inf
    scores = np.full((len(queries), k), pad, np.float32)
    ids = np.full((len(queries), k), -1, np.int64)
    todo, fetch = np.arange(len(queries)), k + min(num_removed, k)
    while len(todo):
        per_shard = search_shards(queries[todo], fetch)
        s, i = merge_topk([p[0] for p in per_shard], [p[1] for p in per_shard], k, larger_is_better)
        scores[todo], ids[todo] = s, i
        more = np.any([p[2] for p in per_shard], axis=0)
        short = ((i >= 0).sum(1) < k) & more & (fetch < k + num_removed)
        todo, fetch = todo[short], min(2 * fetch, k + num_removed)
    scores[ids < 0] = pad
    return scores, ids


def top_identities(gallery, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``search_identities`` over anything with ``search``, ``identities``, ``ntotal``, ``dim``, ``metric``."""
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    if queries.ndim != 2 or queries.shape[1] != gallery.dim:
        raise ValueError(f"queries must be Q×{gallery.dim}, got {queries.shape}")
    check_vectors(queries, "queries", gallery.metric)
    larger = larger_is_closer(gallery.metric)
    out_ident = np.full((len(queries), k), -1, np.int64)
    out_score = np.full((len(queries), k), -np.inf if larger else np.inf, np.float32)
    out_row = np.full((len(queries), k), -1, np.int64)
    todo, fetch = np.arange(len(queries)), 4 * k
    while len(todo):
        ntotal = gallery.ntotal
        scores, rows = gallery.search(queries[todo], min(fetch, max(ntotal, 1)))
        idents = gallery.identities(rows)
        again = []
        for j, q in enumerate(todo):
            valid = rows[j] >= 0
            ident, score, row = idents[j][valid], scores[j][valid], rows[j][valid]
            _, first = np.unique(ident, return_index=True)
            first = np.sort(first)[:k]
            if len(first) < k and valid.all() and fetch < ntotal:
                again.append(q)
            out_ident[q, : len(first)] = ident[first]
            out_score[q, : len(first)] = score[first]
            out_row[q, : len(first)] = row[first]
        todo, fetch = np.asarray(again, dtype=np.int64), 4 * fetch
    return out_ident, out_score, out_row
