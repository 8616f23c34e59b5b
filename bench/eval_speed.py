"""Speed and peak memory of reidscale.evaluate.evaluate_reid against a dense argsort reference.

    python bench/eval_speed.py                      # Market scale (both) + 1M gallery (ours)
    python bench/eval_speed.py --large-gallery 0    # Market scale only

Features have identity structure: unit identity centres + a per-camera offset + noise,
L2-normalised, 6 cameras; the query identities are the first 750, the rest of the gallery
belongs to distractor identities (10 images each). Every measurement runs in its own
spawned process so peak RSS figures are independent; times cover the evaluation only,
not the feature generation. Writes bench/results/eval_speed.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np

from _common import gib, machine_info, print_table, run_isolated, write_results

QUERY_IDS, IMAGES_PER_QUERY_ID, DISTRACTOR_IMAGES_PER_ID, CAMERAS = 750, 17, 10, 6


def make_features(n_query: int, n_gallery: int, dim: int, noise: float, seed: int, chunk: int = 65536):
    """(q, g, q_ids, g_ids, q_cams, g_cams); float32 features built chunk by chunk (no big temporaries)."""
    rng = np.random.default_rng(seed)
    n_true = min(n_gallery, QUERY_IDS * IMAGES_PER_QUERY_ID)
    g_ids = np.concatenate([np.arange(n_true) % QUERY_IDS,
                            QUERY_IDS + np.arange(n_gallery - n_true) // DISTRACTOR_IMAGES_PER_ID])
    q_ids = rng.integers(0, QUERY_IDS, n_query)
    q_cams, g_cams = rng.integers(0, CAMERAS, n_query), rng.integers(0, CAMERAS, n_gallery)
    centres = rng.standard_normal((int(g_ids.max()) + 1, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    cam_offsets = 0.5 * rng.standard_normal((CAMERAS, dim), dtype=np.float32) / np.sqrt(dim)

    def sample(ids, cams):
        out = np.empty((len(ids), dim), np.float32)
        for lo in range(0, len(ids), chunk):
            s = slice(lo, lo + chunk)
            x = rng.standard_normal((len(ids[s]), dim), dtype=np.float32)
            x *= noise / np.sqrt(dim)
            x += centres[ids[s]] + cam_offsets[cams[s]]
            out[s] = x / np.linalg.norm(x, axis=1, keepdims=True)
        return out

    return sample(q_ids, q_cams), sample(g_ids, g_cams), q_ids, g_ids, q_cams, g_cams


def dense_reference(q, g, q_ids, g_ids, q_cams, g_cams, metric: str, max_rank: int) -> dict:
    """Full distance matrix + stable argsort per row, torchreid's eval_market1501 loop."""
    if metric == "cosine":
        q = q / np.linalg.norm(q, axis=1, keepdims=True)
        g = g / np.linalg.norm(g, axis=1, keepdims=True)
        dist = 1 - q @ g.T
    else:
        dist = -2 * (q @ g.T) + (g * g).sum(axis=1)[None, :] + (q * q).sum(axis=1)[:, None]
    all_cmc, all_ap, all_inp = [], [], []
    for i in range(len(q)):
        order = np.argsort(dist[i], kind="stable")
        keep = ~((g_ids[order] == q_ids[i]) & (g_cams[order] == q_cams[i]))
        raw_cmc = (g_ids[order][keep] == q_ids[i]).astype(np.int64)
        if not raw_cmc.any():
            continue
        hits = raw_cmc.cumsum()
        all_cmc.append(np.minimum(hits[:max_rank], 1))
        all_ap.append((hits / np.arange(1.0, len(hits) + 1) * raw_cmc).sum() / hits[-1])
        last = np.flatnonzero(raw_cmc)[-1]
        all_inp.append(hits[last] / (last + 1.0))
    return {"cmc": np.mean(all_cmc, axis=0), "mAP": float(np.mean(all_ap)),
            "mINP": float(np.mean(all_inp)), "num_valid_queries": len(all_ap)}


def timed_run(which: str, n_query: int, n_gallery: int, dim: int, noise: float, seed: int,
              metric: str, repeats: int) -> dict:
    """Runs in a child process: build the data, evaluate `repeats` times, report times and metrics."""
    from reidscale.evaluate import evaluate_reid

    data = make_features(n_query, n_gallery, dim, noise, seed)
    fn = evaluate_reid if which == "ours" else dense_reference
    kwargs = {"metric": metric, "max_rank": 50}
    seconds = []
    for _ in range(repeats):
        t = time.perf_counter()
        result = fn(*data, **kwargs)
        seconds.append(time.perf_counter() - t)
    return {"seconds": seconds, "mAP": result["mAP"], "mINP": result["mINP"],
            "rank1": float(result["cmc"][0]), "num_valid_queries": result["num_valid_queries"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--queries", type=int, default=3368)
    p.add_argument("--gallery", type=int, default=19732, help="Market-scale gallery (both implementations)")
    p.add_argument("--large-gallery", type=int, default=1_000_000, help="ours only; 0 skips it")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--noise", type=float, default=1.75, help="noise norm relative to the unit identity centre")
    p.add_argument("--metric", default="cosine", choices=["cosine", "euclidean"])
    p.add_argument("--repeats", type=int, default=3, help="timed runs per Market-scale measurement")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default="eval_speed", help="results file: bench/results/<name>.json")
    args = p.parse_args()
    at_start = machine_info()
    print(f"machine: {at_start}", flush=True)

    runs = [("ours", args.gallery, args.repeats), ("dense", args.gallery, args.repeats)]
    if args.large_gallery:
        runs.append(("ours", args.large_gallery, 1))
    rows, records = [], []
    for which, n_gallery, repeats in runs:
        print(f"running {which} on {args.queries} x {n_gallery} ...", flush=True)
        r, peak = run_isolated(timed_run, which, args.queries, n_gallery, args.dim, args.noise,
                               args.seed, args.metric, repeats)
        records.append({"implementation": which, "queries": args.queries, "gallery": n_gallery,
                        "dim": args.dim, "metric": args.metric, "peak_rss_bytes": peak, **r})
        rows.append({"impl": which, "Q x G": f"{args.queries} x {n_gallery}",
                     "best s": f"{min(r['seconds']):.2f}", "median s": f"{statistics.median(r['seconds']):.2f}",
                     "peak RSS": gib(peak), "mAP": f"{r['mAP']:.4f}", "mINP": f"{r['mINP']:.4f}",
                     "rank-1": f"{r['rank1']:.4f}"})

    ours, dense = records[0], records[1]
    same = all(abs(ours[k] - dense[k]) <= 1e-6 for k in ("mAP", "mINP", "rank1"))
    speedup = min(dense["seconds"]) / min(ours["seconds"])
    print_table(rows)
    print(f"speed-up at {args.queries} x {args.gallery} (best of {args.repeats}): {speedup:.1f}x; "
          f"results identical to 1e-6: {same}")
    path = write_results(args.name, {"args": vars(args), "runs": records,
                                     "speedup_market_scale": speedup, "identical_results": same,
                                     "load_average_at_start": at_start["load_average_1_5_15min"]})
    print(f"wrote {path}")
    if not same:
        raise SystemExit("ours and the dense reference disagree")


if __name__ == "__main__":
    main()
