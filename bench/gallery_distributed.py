"""Queries/s of the single-process ``Gallery`` vs ``DistributedGallery`` (shard actors) on one index.

    python bench/gallery_distributed.py --n 400000 --dim 128 --actors 2

Builds (once, cached under runs/bench/gallery_distributed/) an IVF-PQ + exact re-rank index of a
random unit-norm gallery in 4 shards, then searches the same query batches through both, on a
private Ray on this machine (both "nodes" share its cores: this measures the scatter/gather
overhead, not a speed-up), checking that both return the same ids and scores. The 1M and 10M
rows of issue 17 need a multi-machine cluster and a quiet machine; not run here.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

OUT = Path("runs/bench/gallery_distributed")


def _qps(search, queries: np.ndarray, k: int, batch: int, repeats: int = 3) -> tuple[float, tuple]:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        hits = [search(queries[lo: lo + batch], k) for lo in range(0, len(queries), batch)]
        best = min(best, time.perf_counter() - t0)
    return len(queries) / best, (np.concatenate([h[0] for h in hits]), np.concatenate([h[1] for h in hits]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=400_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--actors", type=int, default=2)
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 100, 1000])
    args = parser.parse_args()

    from reidscale.index.build import build_index
    from reidscale.index.distributed import DistributedGallery
    from reidscale.index.gallery import Gallery
    from reidscale.ray_runtime import init_ray

    rng = np.random.default_rng(0)
    x = rng.standard_normal((args.n, args.dim)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    q = x[rng.choice(args.n, args.queries, replace=False)] + 0.05 * rng.standard_normal((args.queries, args.dim))
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    index = OUT / f"index-{args.n}x{args.dim}"
    meta = pa.table({"row_id": np.arange(args.n, dtype=np.int64), "identity": np.arange(args.n) // 4,
                     "camera": np.zeros(args.n, np.int32), "path": pa.array([""] * args.n)})
    build_index(x, meta, index, factory="IVF512,PQ32x4fs,RFlat", num_shards=4, train_size=32768, calibration=None,
                search_params={"nprobe": 16, "k_factor_rf": 16}, log=lambda *_: None)
    init_ray(num_cpus=2, include_dashboard=False)
    local = Gallery(index)
    dist = DistributedGallery(index, num_actors=args.actors, actor_cpus=0.5)
    rows = []
    for batch in args.batch:
        local_qps, want = _qps(local.search, q, 10, batch)
        dist_qps, got = _qps(dist.search, q, 10, batch)
        assert np.array_equal(want[1], got[1]) and np.array_equal(want[0], got[0]), "distributed hits differ"
        rows.append({"n": args.n, "dim": args.dim, "batch": batch, "gallery_qps": local_qps,
                     "distributed_qps": dist_qps, "actors": args.actors})
        print(f"{args.n:,} × {args.dim}, batch {batch:>5}: Gallery {local_qps:8.0f} q/s | "
              f"{args.actors} shard actors {dist_qps:8.0f} q/s | same ids and scores", flush=True)
    dist.close()
    (OUT / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
