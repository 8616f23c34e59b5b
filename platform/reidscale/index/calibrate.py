"""Search-time settings measured on the gallery's own vectors: the cheapest that reach a target recall.

A fixed rule (``nprobe = max(16, nlist/64)``) holds only for the data it was tuned on: on
identity embeddings whose centres spread over ~50 effective dimensions it lost a third of
the true neighbours (issue 13). So, like autofaiss, after building we measure instead of
assuming:

* queries: one gallery row of each of a seeded sample of identities (``sample_query_rows``),
  or the user's own query vectors;
* ground truth: exact top-k by FAISS ``IndexFlat`` over the gallery in chunks of
  ``CHUNK`` rows (memory bounded by one chunk, whatever the gallery size);
* a gallery row used as a query is its own best hit in both lists: it is dropped from
  both, so recall counts the neighbours a real query would need. For IVF this matches
  real queries; an HNSW graph still favours its own nodes (the search starts near the
  query's own links), so gallery rows overstate HNSW recall: give real queries for HNSW;
* settings tried: ``nprobe`` (IVF) × ``k_factor_rf`` (exact re-ranking, widest first), or
  ``efSearch`` (HNSW), each increased until the target recall@k is reached or a setting is
  slower than one that already reached it; the setting with the most
  queries/s among those that reach it is chosen. If none does, the best recall is kept
  and the report says so (``reached`` false, a one-line ``message``).

Functions take plain arrays and a ``search(queries, k, params) -> ids`` callable, so they
run without a ``Gallery`` (and without Ray).
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable

import numpy as np

from reidscale.index.metric import larger_is_closer

log = logging.getLogger(__name__)

CHUNK = 1 << 16
KF_STEPS = (4, 16, 64)  # exact re-ranking is cheap next to cell scans: a few widths suffice


@dataclass
class CalibrationSpec:
    """What calibration aims for. ``recalibrate_fraction``: ``Gallery.add`` re-measures once the
    rows added since the last calibration exceed this fraction of the gallery measured then.

    ``confidence``: a setting reaches ``target_recall`` when the one-sided lower confidence bound
    of its mean recall over the sampled queries does (mean − z·sd/√Q), not the mean alone: the
    mean of 1,000 queries is itself uncertain by ~0.003, and a setting chosen at 0.952 then gave
    0.948 on new queries at 10M (docs/benchmarks.md). 0.5 compares the mean itself.
    """

    target_recall: float = 0.95
    recall_k: int = 10
    sample: int = 1000
    seed: int = 0
    recalibrate_fraction: float = 0.1
    confidence: float = 0.95

    def validate(self) -> None:
        if not 0 < self.target_recall <= 1:
            raise ValueError(f"target_recall: {self.target_recall} is not in (0, 1]")
        if not 0.5 <= self.confidence < 1:
            raise ValueError(f"calibration_confidence: {self.confidence} is not in [0.5, 1)")
        if self.recall_k < 1:
            raise ValueError(f"recall_k: {self.recall_k} must be >= 1")
        if self.sample < 1:
            raise ValueError(f"calibration_sample: {self.sample} must be >= 1")
        if self.recalibrate_fraction <= 0:
            raise ValueError(f"recalibrate_fraction: {self.recalibrate_fraction} must be > 0")


def exact_topk(chunks: Iterable[tuple[np.ndarray, np.ndarray]], queries: np.ndarray, k: int,
               metric: str) -> tuple[np.ndarray, np.ndarray]:
    """Exact (scores, ids) Q×k over ``(vectors, ids)`` chunks, by FAISS ``IndexFlat`` per ``CHUNK`` rows.

    Ties are broken by id (smaller first), so the result does not depend on the chunking.
    """
    import faiss

    from reidscale.index.hits import merge_topk

    larger = larger_is_closer(metric)
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_s = [np.full((len(queries), 0), -np.inf if larger else np.inf, np.float32)]
    best_i = [np.zeros((len(queries), 0), np.int64)]
    for vectors, ids in chunks:
        for lo in range(0, len(ids), CHUNK):
            x = np.ascontiguousarray(vectors[lo : lo + CHUNK], dtype=np.float32)
            flat = faiss.IndexFlatIP(x.shape[1]) if larger else faiss.IndexFlatL2(x.shape[1])
            flat.add(x)
            s, i = flat.search(queries, min(k, len(x)))
            chunk_ids = np.asarray(ids[lo : lo + CHUNK], dtype=np.int64)
            best_s.append(s)
            best_i.append(np.where(i >= 0, chunk_ids[np.maximum(i, 0)], -1))
            s, i = merge_topk(best_s, best_i, k, larger)
            best_s, best_i = [s], [i]
    return best_s[0], best_i[0]


def drop_self(ids: np.ndarray, self_ids: np.ndarray | None, k: int) -> np.ndarray:
    """The first ``k`` ids of each row that are not that row's own id (``self_ids`` None: no-op)."""
    if self_ids is None:
        return ids[:, :k]
    keep = ids != self_ids[:, None]
    # rows where the query's own id was not found drop their last hit instead
    keep[keep.all(axis=1), -1] = False
    return ids[keep].reshape(len(ids), -1)[:, :k]


def recall_per_query(found: np.ndarray, truth: np.ndarray, k: int) -> np.ndarray:
    """|found[:, :k] ∩ truth[:, :k]| / k per query (ids; -1 never counts)."""
    f, t = found[:, :k], truth[:, :k]
    hits = (f[:, :, None] == t[:, None, :]) & (f[:, :, None] >= 0)
    return hits.any(axis=2).sum(axis=1) / k


def recall_at(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean |found[:, :k] ∩ truth[:, :k]| / k (ids; -1 never counts)."""
    return float(recall_per_query(found, truth, k).mean())


def lower_bound(per_query: np.ndarray, confidence: float) -> float:
    """One-sided lower confidence bound of the mean of ``per_query`` (normal approximation)."""
    from statistics import NormalDist

    if len(per_query) < 2 or confidence <= 0.5:
        return float(per_query.mean())
    z = NormalDist().inv_cdf(confidence)
    return float(per_query.mean() - z * per_query.std(ddof=1) / np.sqrt(len(per_query)))


def _ladder(top: int) -> list[int]:
    """1, 2, 3, 4, 6, 8, 12, ... up to and including ``top``: steps of ~1.5× so the choice is not 2× too slow."""
    steps, p = [], 1
    while p < top:
        steps += [p] + ([p * 3 // 2] if p >= 2 and p * 3 // 2 < top else [])
        p *= 2
    return sorted(set(steps + [top]))


def _ivf_nlist(factory: str) -> int | None:
    head = factory.split(",")[0]
    if head.startswith("IVF"):
        return int(head[3:].split("_")[0])
    return None


def calibrate_settings(search: Callable[[np.ndarray, int, dict], np.ndarray], queries: np.ndarray,
                       truth: np.ndarray, factory: str, spec: CalibrationSpec, *,
                       self_ids: np.ndarray | None = None, budget_bytes: int | None = None) -> dict:
    """Try settings for ``factory``; return the report (chosen settings, recall, q/s, every setting tried).

    ``truth``: exact top-``recall_k`` ids per query (self excluded). ``search(q, k, params)``
    returns Q×k ids with ``params`` applied; it is called with ``recall_k + 1`` when
    ``self_ids`` are given, so the query's own row can be dropped.
    """
    k = spec.recall_k
    fetch = k + (self_ids is not None)
    tried: list[dict] = []

    def measure(params: dict) -> dict:
        search(queries[: min(64, len(queries))], fetch, params)  # warm-up: first touch of the lists
        t0 = time.perf_counter()
        ids = drop_self(search(queries, fetch, params), self_ids, k)
        elapsed = max(time.perf_counter() - t0, 1e-9)
        per_query = recall_per_query(ids, truth, k)
        row = {"params": dict(params), "recall_at_1": recall_at(ids, truth, 1), "recall_at_k": float(per_query.mean()),
               "recall_at_k_low": lower_bound(per_query, spec.confidence), "qps": len(queries) / elapsed}
        tried.append(row)
        log.info("calibration %s: recall@%d %.4f (lower bound %.4f), %.0f q/s", params, k, row["recall_at_k"],
                 row["recall_at_k_low"], row["qps"])
        return row

    def reaches(row: dict) -> bool:
        return row["recall_at_k_low"] >= spec.target_recall

    def climb(name: str, values: list[int], fixed: dict) -> int | None:
        """Smallest value of ``name`` (ascending) reaching the target, or None. Stops early once a
        setting is slower than the fastest one already reaching the target: more only gets slower."""
        for v in values:
            row = measure({**fixed, name: v})
            if reaches(row):
                return v
            if any(reaches(r) and r["qps"] > row["qps"] for r in tried[:-1]):
                return None
        return None

    t0 = time.perf_counter()
    nlist = _ivf_nlist(factory)
    refine = "RFlat" in factory or "Refine(" in factory
    if nlist is not None:
        # widest re-ranking first: it needs the fewest cells, and a narrower one never needs
        # fewer, so each narrower climb starts where the wider one reached the target (and
        # when the widest never does, no other can: one ladder, not one per width)
        floor = 1
        for kf in (sorted(KF_STEPS, reverse=True) if refine else (None,)):
            fixed = {} if kf is None else {"k_factor_rf": kf}
            found = climb("nprobe", [p for p in _ladder(nlist) if p >= floor], fixed)
            if found is None:
                break
            floor = found
    elif "HNSW" in factory:
        climb("efSearch", [e for e in (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048, 4096)
                           if e >= k], {})
    else:
        measure({})  # nothing to set (Flat): the measurement is the record

    if "HNSW" in factory and self_ids is not None:
        log.warning("calibrating %s on gallery rows overstates its recall on new queries (the graph links each "
                    "row to its neighbours); give calibration_queries for a faithful measurement", factory)
    reached = [r for r in tried if reaches(r)]
    if reached:
        # q/s of a single timing is noisy on shared cores: time the close contenders again
        top = max(r["qps"] for r in reached)
        for r in [r for r in reached if r["qps"] >= 0.8 * top and len(tried) > 1]:
            again = measure(r["params"])
            tried.pop()
            r["qps"] = max(r["qps"], again["qps"])
        best = max(reached, key=lambda r: r["qps"])
        message = ""
    else:
        best = max(tried, key=lambda r: (r["recall_at_k"], r["qps"]))
        budget = f"memory budget {budget_bytes / 2**30:.2f} GiB" if budget_bytes else "the given factory"
        message = (f"target recall@{k} {spec.target_recall} not reached by {factory} under {budget}: "
                   f"best {best['recall_at_k']:.4f} at {best['params']}; kept that setting "
                   "(raise memory_budget_gb or give a larger factory)")
        log.warning(message)
    return {
        **asdict(spec),
        "sample": int(len(queries)),
        "queries_source": "gallery rows, one per identity" if self_ids is not None else "given queries",
        "factory": factory,
        "chosen": best["params"],
        "recall_at_1": best["recall_at_1"],
        "recall_at_k": best["recall_at_k"],
        "recall_at_k_low": best["recall_at_k_low"],
        "qps": best["qps"],
        "reached": bool(reached),
        "message": message,
        "tried": tried,
        "time_s": time.perf_counter() - t0,
    }


def sample_query_rows(identity: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted positions of ``min(size, n)`` gallery rows to use as queries: one random row of each of
    ``size`` random identities (identity -1, a distractor, is never a query).

    Why not uniform rows: a uniform sample is dominated by the few identities with hundreds
    of images, whose neighbours are their own tight cluster, and overstated recall on real
    queries (one or a few per identity) by 0.02-0.16 in bench/index_scale.py's data; one row
    per identity matched them within 0.002 for IVF. Galleries without identities, or with
    fewer than ``size``, fill up with uniform rows.
    """
    rng = np.random.default_rng(seed)
    n = len(identity)
    perm = rng.permutation(n)
    ident = np.asarray(identity)[perm]
    _, first = np.unique(ident, return_index=True)
    first = first[ident[first] >= 0]
    chosen = perm[rng.choice(first, min(size, len(first)), replace=False)] if len(first) else np.zeros(0, np.int64)
    if len(chosen) < min(size, n):
        rest = np.setdiff1d(np.arange(n), chosen)
        chosen = np.concatenate([chosen, rng.choice(rest, min(size, n) - len(chosen), replace=False)])
    return np.sort(chosen)


def plot_tradeoff(report: dict, path) -> None:
    """recall@k against queries/s of every setting tried (PNG), the chosen one marked."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    rows = report["tried"]
    ax.scatter([r["qps"] for r in rows], [r["recall_at_k"] for r in rows], s=14)
    for r in rows:
        ax.annotate(",".join(f"{k}={v}" for k, v in sorted(r["params"].items())), (r["qps"], r["recall_at_k"]),
                    fontsize=5, alpha=0.7)
    ax.scatter([report["qps"]], [report["recall_at_k"]], s=60, facecolors="none", edgecolors="red", label="chosen")
    ax.axhline(report["target_recall"], color="grey", ls="--", lw=0.8, label="target")
    ax.set_xscale("log")
    ax.set_xlabel("queries/s (calibration sample, one batch)")
    ax.set_ylabel(f"recall@{report['recall_k']} vs exact")
    ax.set_title(f"{report['factory']}: {report['sample']} queries")
    ax.legend(loc="lower left", fontsize=7)
    fig.tight_layout()
    from reidscale import atomic

    atomic.write_file(path, lambda tmp: fig.savefig(str(tmp), dpi=120, format="png"))
