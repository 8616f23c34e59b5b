"""Speed, peak memory and mAP of k-reciprocal re-ranking (reidscale.evaluate.evaluate_reid_reranked)
against the authors' dense algorithm, at Market-1501 scale.

    python bench/rerank_speed.py                                   # Market scale, ours + dense
    python bench/rerank_speed.py --large-gallery 200000 --large-dim 64   # + ours on a big gallery

Features come from bench/eval_speed.py's generator (identity centres + camera offsets + noise,
L2-normalised). Every measurement runs in its own spawned process (independent peak RSS); times
cover the re-ranking and its evaluation, not the feature generation. "dense" is Zhong et al.'s
re_ranking on full (Q+G)^2 float32 matrices (distance, V, V after query expansion) with the
authors' inverted-index Jaccard loop, then a stable argsort per query row; its final matrix is
kept in a temporary file so a last process can check ours against it entry by entry.
Writes bench/results/<name>.json.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

import numpy as np

from _common import gib, machine_info, print_table, run_isolated, write_results
from eval_speed import make_features


def dense_re_ranking(q, g, k1: int, k2: int, lambda_value: float) -> np.ndarray:
    """The authors' algorithm on dense matrices; cosine features (unit rows), so d = 2 - 2 cos.

    Neighbour lists are each row's k1 + 1 smallest by stable argsort, computed in row blocks
    (the full argsort the authors run would add an (Q+G)^2 int64 matrix and change nothing).
    """
    n_q = len(q)
    x = np.concatenate([q, g])
    dist = x @ x.T  # (N, N) float32, ~2.1 GB at Market scale
    np.multiply(dist, np.float32(-2), out=dist)
    dist += np.float32(2)  # squared Euclidean distance of unit vectors
    # the authors divide each column by its max and transpose; x @ x.T is symmetric (numpy calls
    # syrk), so dividing each row by its max in place is the same and keeps rows contiguous
    dist /= dist.max(axis=1, keepdims=True)
    n = len(dist)
    rank = np.empty((n, k1 + 1), np.int64)
    for lo in range(0, n, 1024):
        rank[lo : lo + 1024] = np.argsort(dist[lo : lo + 1024], axis=1, kind="stable")[:, : k1 + 1]

    def k_reciprocal(i, k):
        forward = rank[i, : k + 1]
        return forward[(rank[forward, : k + 1] == i).any(axis=1)]

    v = np.zeros((n, n), np.float32)
    half = int(np.around(k1 / 2))
    for i in range(n):
        r = k_reciprocal(i, k1)
        expansion = [r]
        for c in r:
            r_half = k_reciprocal(c, half)
            if len(np.intersect1d(r_half, r)) > 2 / 3 * len(r_half):
                expansion.append(r_half)
        expansion = np.unique(np.concatenate(expansion))
        w = np.exp(-dist[i, expansion])
        v[i, expansion] = w / w.sum()
    if k2 != 1:
        v_qe = np.zeros_like(v)
        for i in range(n):
            v_qe[i] = v[rank[i, :k2]].mean(axis=0)
        v = v_qe
        del v_qe
    holder, neighbour = np.nonzero(v)  # the authors' inverted index: items holding each neighbour
    order = np.argsort(neighbour, kind="stable")
    inv_index = np.split(holder[order], np.searchsorted(neighbour[order], np.arange(1, n)))
    final = np.empty((n_q, n - n_q), np.float32)
    for i in range(n_q):
        overlap = np.zeros(n, np.float32)
        for f in np.flatnonzero(v[i]):
            overlap[inv_index[f]] += np.minimum(v[i, f], v[inv_index[f], f])
        jaccard = 1 - overlap / (2 - overlap)
        final[i] = (jaccard * (1 - lambda_value) + dist[i] * lambda_value)[n_q:]
    return final


def evaluate_dense(dist, q_ids, g_ids, q_cams, g_cams) -> dict:
    """Market-1501 protocol on a full matrix: stable argsort per row, same id + camera removed."""
    first, aps, inps = [], [], []
    for i in range(len(dist)):
        order = np.argsort(dist[i], kind="stable")
        keep = ~((g_ids[order] == q_ids[i]) & (g_cams[order] == q_cams[i]))
        ranks = np.flatnonzero(g_ids[order][keep] == q_ids[i])
        if len(ranks):
            aps.append(np.mean((np.arange(len(ranks)) + 1) / (ranks + 1.0)))
            inps.append(len(ranks) / (ranks[-1] + 1.0))
            first.append(ranks[0])
    return {"mAP": float(np.mean(aps)), "mINP": float(np.mean(inps)), "rank1": float(np.mean(np.array(first) == 0)),
            "num_valid_queries": len(aps)}


def timed_run(which: str, n_query: int, n_gallery: int, dim: int, noise: float, seed: int, params: dict,
              candidates: int | None, dense_file: str | None = None) -> dict:
    """In a child process: build the data, run one implementation once, report time and metrics."""
    from reidscale.evaluate import evaluate_reid, evaluate_reid_reranked, rerank

    q, g, q_ids, g_ids, q_cams, g_cams = make_features(n_query, n_gallery, dim, noise, seed)
    t = time.perf_counter()
    if which in ("plain", "ours"):
        r = (evaluate_reid(q, g, q_ids, g_ids, q_cams, g_cams, metric="cosine") if which == "plain" else
             evaluate_reid_reranked(q, g, q_ids, g_ids, q_cams, g_cams, metric="cosine", candidates=candidates,
                                    **params))
        r = {"mAP": r["mAP"], "mINP": r["mINP"], "rank1": float(r["cmc"][0]),
             "num_valid_queries": r["num_valid_queries"]}
    elif which == "dense":
        final = dense_re_ranking(q, g, params["k1"], params["k2"], params["lambda_value"])
        r = evaluate_dense(final, q_ids, g_ids, q_cams, g_cams)
        np.save(dense_file, final)
    else:  # agreement: ours over the whole gallery against the dense matrix, entry by entry
        idx, dist = rerank(q, g, metric="cosine", candidates=None, **params)
        full = np.empty_like(dist)
        np.put_along_axis(full, idx, dist, axis=1)
        r = {"max_abs_diff": float(np.abs(full - np.load(dense_file)).max())}
    return {"seconds": time.perf_counter() - t, **r}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=3368)
    p.add_argument("--gallery", type=int, default=19732)
    p.add_argument("--dim", type=int, default=512)
    # eval_speed.py's 1.75 leaves re-ranking nothing to show (whole-gallery re-ranked mAP 1.0000)
    p.add_argument("--noise", type=float, default=2.25, help="noise norm relative to the unit identity centre")
    p.add_argument("--candidates", default="100,200,all", help="ours: gallery items re-ranked per query")
    p.add_argument("--k1", type=int, default=20)
    p.add_argument("--k2", type=int, default=6)
    p.add_argument("--lambda-value", type=float, default=0.3)
    p.add_argument("--no-dense", action="store_true", help="skip the dense reference (~10 GB RAM)")
    p.add_argument("--large-gallery", type=int, default=0, help="ours only, default candidates; 0 skips it")
    p.add_argument("--large-dim", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="rerank_speed", help="results file: bench/results/<name>.json")
    args = p.parse_args()
    at_start = machine_info()
    print(f"machine: {at_start}", flush=True)
    params = {"k1": args.k1, "k2": args.k2, "lambda_value": args.lambda_value}
    dense_file = os.path.join(tempfile.mkdtemp(prefix="rerank_bench_"), "dense.npy")

    runs = [("plain", args.gallery, args.dim, None)]
    runs += [("ours", args.gallery, args.dim, None if c == "all" else int(c)) for c in args.candidates.split(",")]
    if not args.no_dense:
        runs += [("dense", args.gallery, args.dim, None), ("agreement", args.gallery, args.dim, None)]
    if args.large_gallery:
        runs += [("plain", args.large_gallery, args.large_dim, None), ("ours", args.large_gallery, args.large_dim, 200)]
    rows, records = [], []
    for which, n_gallery, dim, candidates in runs:
        print(f"running {which} (candidates={candidates or 'all'}) on {args.queries} x {n_gallery} x {dim}-d ...",
              flush=True)
        r, peak = run_isolated(timed_run, which, args.queries, n_gallery, dim, args.noise, args.seed, params,
                               candidates, dense_file)
        records.append({"implementation": which, "queries": args.queries, "gallery": n_gallery, "dim": dim,
                        "candidates": candidates or "all", "peak_rss_bytes": peak, "load_average": os.getloadavg(),
                        **r})
        print(f"  {r}", flush=True)
        if which == "agreement":
            continue
        rows.append({"impl": which if which != "plain" else "no re-ranking",
                     "Q x G x D": f"{args.queries} x {n_gallery} x {dim}",
                     "candidates": "-" if which == "plain" else (candidates or "all"),
                     "seconds": f"{r['seconds']:.1f}", "peak RSS": gib(peak), "mAP": f"{r['mAP']:.4f}",
                     "mINP": f"{r['mINP']:.4f}", "rank-1": f"{r['rank1']:.4f}"})
    if os.path.exists(dense_file):
        os.remove(dense_file)
        os.rmdir(os.path.dirname(dense_file))

    print_table(rows)
    by = {(r["implementation"], r["gallery"], r["candidates"]): r for r in records}
    summary = {}
    dense, ours_all = by.get(("dense", args.gallery, "all")), by.get(("ours", args.gallery, "all"))
    if dense and ours_all:
        summary = {"identical_metrics_1e-6": all(abs(dense[k] - ours_all[k]) <= 1e-6 for k in ("mAP", "mINP", "rank1")),
                   "max_abs_diff_final_distance": by[("agreement", args.gallery, "all")]["max_abs_diff"],
                   "speedup_whole_gallery": dense["seconds"] / ours_all["seconds"],
                   "peak_rss_ratio_dense_over_ours": dense["peak_rss_bytes"] / ours_all["peak_rss_bytes"]}
        print(f"ours (candidates=all) vs dense: {summary}")
    path = write_results(args.name, {"args": vars(args), "runs": records, **summary,
                                     "load_average_at_start": at_start["load_average_1_5_15min"]})
    print(f"wrote {path}; load average now {os.getloadavg()}")
    if summary and not summary["identical_metrics_1e-6"]:
        raise SystemExit("ours and the dense reference disagree")


if __name__ == "__main__":
    main()
