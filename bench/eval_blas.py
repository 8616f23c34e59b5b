"""What BLAS-independent distances cost and buy: evaluate_reid with float64-accumulated distances
(the library) against the float32 GEMM it used before, in one run, under this process's BLAS kernel.

    python bench/eval_blas.py                                  # default OpenBLAS kernel
    OPENBLAS_CORETYPE=Haswell python bench/eval_blas.py        # the kernel that broke the tests

Rows: (1) time at Market scale (bench/eval_speed.py's features, 3,368 x 19,732 x 512, cosine), best of
3, the two variants alternating so machine load hits both alike; (2) on duplicate-heavy data (every
gallery vector three times), how far mAP and the CMC move between chunk sizes (None, 1, 7, 64) for
each variant: the float32 variant's spread is the bug of issue 12 §1, the library's must be 0.
Writes bench/results/eval_blas_<kernel>.json.
"""

from __future__ import annotations

import time

import numpy as np
from threadpoolctl import threadpool_info

from _common import machine_info, print_table, write_results
from eval_speed import make_features


def float32_distance_block(q, g, metric, q_sq=None, g_sq=None, duplicates=None):
    """The distances before the fix: one float32 GEMM, no duplicate handling (what a user would write)."""
    d = q @ g.T if len(q) > 1 else (np.concatenate([q, q]) @ g.T)[:1]
    if metric == "cosine":
        np.subtract(np.float32(1), d, out=d)
    else:
        d *= np.float32(-2)
        d += g_sq[None, :].astype(np.float32)
        d += q_sq[:, None].astype(np.float32)
    return d


def float32_gallery(g, normalise, chunk=1 << 14):
    """The gallery before the fix: float32, normalised for cosine (no float64 copy)."""
    return g / np.linalg.norm(g, axis=1, keepdims=True) if normalise else g


def variant(name: str):
    import reidscale.evaluate.metrics as metrics

    block = metrics.__dict__.setdefault("_library_distance_block", metrics.distance_block)
    gallery = metrics.__dict__.setdefault("_library_prepared_gallery", metrics.prepared_gallery)
    library = name == "float64 (library)"
    metrics.distance_block = block if library else float32_distance_block
    metrics.prepared_gallery = gallery if library else float32_gallery


def evaluate(name, *data, **kw):
    from reidscale.evaluate import evaluate_reid

    variant(name)
    try:
        return evaluate_reid(*data, **kw)
    finally:
        variant("float64 (library)")


def main() -> None:
    at_start = machine_info()
    kernel = ",".join(sorted({i.get("architecture") or "?" for i in threadpool_info() if i.get("internal_api") == "openblas"}))
    print(f"machine: {at_start}\nOpenBLAS kernel: {kernel}", flush=True)
    names = ["float64 (library)", "float32 GEMM (before)"]

    data = make_features(3368, 19732, 512, 1.75, 0)
    seconds = {n: [] for n in names}
    for _ in range(3):
        for n in names:
            t = time.perf_counter()
            evaluate(n, *data, metric="cosine", max_rank=50)
            seconds[n].append(time.perf_counter() - t)

    rng = np.random.default_rng(1)
    q, g, q_ids, g_ids, q_cams, g_cams = make_features(500, 2000, 512, 1.75, 1)
    g, g_cams = np.repeat(g, 3, axis=0), np.repeat(g_cams, 3)
    g_ids = np.where(np.arange(len(g)) % 3 == 0, np.repeat(g_ids, 3), rng.integers(0, 750, len(g)))
    spread = {}
    for n in names:
        results = [evaluate(n, q, g, q_ids, g_ids, q_cams, g_cams, metric="cosine", max_rank=20, chunk_size=c)
                   for c in (None, 1, 7, 64)]
        maps = [r["mAP"] for r in results]
        cmcs = np.array([r["cmc"] for r in results])
        spread[n] = {"mAP_spread": float(max(maps) - min(maps)), "cmc_spread": float((cmcs.max(0) - cmcs.min(0)).max())}

    best = {n: min(s) for n, s in seconds.items()}
    rows = [{"distances": n, "best s (3368 x 19732)": f"{best[n]:.2f}", "x float32": f"{best[n] / best[names[1]]:.2f}",
             "mAP spread over chunk sizes": f"{spread[n]['mAP_spread']:.1e}",
             "CMC spread": f"{spread[n]['cmc_spread']:.1e}"} for n in names]
    print_table(rows)
    end = machine_info()["load_average_1_5_15min"]
    path = write_results(f"eval_blas_{kernel.lower()}", {
        "kernel": kernel, "seconds": seconds, "best": best, "cost_ratio": best[names[0]] / best[names[1]],
        "chunk_spread_duplicate_heavy": spread, "load_average_at_start": at_start["load_average_1_5_15min"],
        "load_average_at_end": end})
    print(f"load average at end: {end}\nwrote {path}")


if __name__ == "__main__":
    main()
