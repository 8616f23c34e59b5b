"""The single-process gallery vs the distributed one on a real two-node Ray cluster, at 1M vectors.

    python bench/gallery_distributed.py                       # 1M × 128-d, middim
    python bench/gallery_distributed.py --n 200000 --name gallery_distributed_small   # quick

Both nodes run on this machine, on loopback (clusters/local/two_nodes.py: a head and a second
`ray start --address=...`, each reserving ``--node-cpus`` CPUs), so they share its cores: the
figures are the cost of distribution (tasks, actors, scatter/gather) on the same hardware, not a
speed-up. The gallery is ``middim`` (``reidscale.index.synthetic_embeddings``, as in
bench/index_scale.py), cached under runs/bench/index_scale/.

* **Build**: ``build_index`` in one process (no Ray), calibrated as the job builds; then the same
  index with ``shard_tasks=True`` (each shard checked, hashed and filled by a Ray task reading
  only its rows of the .npy; the calibrated settings given, so both indexes search alike). Wall
  time and peak RSS of the building process (the driver), and of the Ray worker processes
  (sampled every 0.2 s) with the node each ran on.
* **Search**: ``Gallery`` vs ``DistributedGallery`` (one shard actor per node) on the task-built
  index: queries/s per batch size (best of 3), recall@10 against FAISS exact search, and the
  check that both return the same ids and scores.

Writes bench/results/<name>.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

from _common import Periodic, gib, machine_info, print_table, recall_at_k, run_isolated, write_results
from index_ondisk import ground_truth
from index_scale import WORK, distribution_embeddings

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "clusters" / "local"))
from two_nodes import two_node_cluster  # noqa: E402

K = 10


def build_in_process(data: str, index_dir: str, shards: int) -> dict:
    import pyarrow.parquet as pq

    from reidscale.index.build import build_index

    vectors = np.load(f"{data}/gallery.npy", mmap_mode="r")
    t0 = time.perf_counter()
    manifest = build_index(vectors, pq.read_table(f"{data}/gallery.parquet"), index_dir, num_shards=shards,
                           log=lambda *_: None)
    return {"build_s": time.perf_counter() - t0, "factory": manifest["factory"], "search": manifest["search"]}


def build_with_tasks(data: str, index_dir: str, shards: int, factory: str, search: dict) -> dict:
    """Runs in a spawned driver that joins the cluster (RAY_ADDRESS and the token are in its environment)."""
    from reidscale.index.build import build_index
    from reidscale.index.job import open_precomputed_rows

    rows, meta, _ = open_precomputed_rows(Path(data) / "gallery.npy")
    t0 = time.perf_counter()
    manifest = build_index(rows, meta, index_dir, num_shards=shards, factory=factory, search_params=search,
                           shard_tasks=True, log=lambda *_: None)
    return {"build_s": time.perf_counter() - t0, "fill_nodes": manifest["fill"]["nodes"]}


class WorkerPeaks(Periodic):
    """Peak RSS of every Ray worker process (``ray::`` in its title) seen while running: ``peaks``."""

    def __init__(self, interval: float = 0.2):
        self.peaks: dict[int, int] = {}
        super().__init__(self._record, interval)

    def _record(self) -> None:
        import psutil

        for p in psutil.process_iter(["name", "cmdline", "memory_info"]):
            title = " ".join(p.info["cmdline"] or []) + (p.info["name"] or "")
            if "ray::" in title and p.info["memory_info"] is not None:
                self.peaks[p.pid] = max(self.peaks.get(p.pid, 0), p.info["memory_info"].rss)


def qps(search, queries: np.ndarray, batch: int, repeats: int = 3) -> tuple[float, tuple]:
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        hits = [search(queries[lo: lo + batch], K) for lo in range(0, len(queries), batch)]
        best = min(best, time.perf_counter() - t0)
    return len(queries) / best, (np.concatenate([h[0] for h in hits]), np.concatenate([h[1] for h in hits]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--distribution", default="middim")
    parser.add_argument("--queries", type=int, default=1000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--node-cpus", type=int, default=1)
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument("--name", default="gallery_distributed_1m")
    args = parser.parse_args()

    import shutil

    data = WORK / f"{args.distribution}-{args.dim}-{args.n}-q{args.queries}"
    if not (data / "gallery.npy").is_file():
        print(f"generating {data.name} ...", flush=True)
        run_isolated(distribution_embeddings, data, args.distribution, args.n, args.dim, args.queries)
    exact, _ = run_isolated(ground_truth, str(data))
    truth = np.load(data / "exact_ids_faiss.npy")
    local_dir, tasks_dir = WORK / "indexes" / f"dist-local-{data.name}", WORK / "indexes" / f"dist-tasks-{data.name}"
    for d in (local_dir, tasks_dir):
        shutil.rmtree(d, ignore_errors=True)

    print("build in one process (calibrated) ...", flush=True)
    local, local_peak = run_isolated(build_in_process, str(data), str(local_dir), args.shards)
    result = {"n": args.n, "dim": args.dim, "distribution": args.distribution, "shards": args.shards,
              "node_cpus": args.node_cpus, "exact": exact,
              "build_in_process": {**local, "peak_rss": local_peak}}
    with two_node_cluster(resources=({"node_a": 1}, {"node_b": 1}), num_cpus=args.node_cpus,
                          object_store_bytes=500_000_000, prefix="rs-bench-") as cluster:
        import ray

        node_names = {nid: ("head" if "node_a" in res else "second") for nid, res in cluster["nodes"].items()}
        print(f"build with Ray tasks on {len(node_names)} nodes ...", flush=True)
        with WorkerPeaks() as workers:
            tasks, driver_peak = run_isolated(build_with_tasks, str(data), str(tasks_dir), args.shards,
                                              local["factory"], local["search"])
        result["build_tasks"] = {**tasks, "driver_peak_rss": driver_peak,
                                 "worker_peak_rss": max(workers.peaks.values(), default=0),
                                 "fill_nodes": [node_names.get(n, n) for n in tasks["fill_nodes"].values()]}

        from reidscale.index.distributed import DistributedGallery
        from reidscale.index.gallery import Gallery

        queries = np.load(data / "queries.npy")
        single = Gallery(tasks_dir)
        dist = DistributedGallery(tasks_dir, actor_cpus=args.node_cpus)
        placement = [node_names.get(p["node"], p["node"]) for p in dist.describe_actors()]
        rows = []
        try:
            for batch in args.batch:
                qs = queries[: min(len(queries), 200)] if batch == 1 else queries
                single_qps, want = qps(single.search, qs, batch)
                dist_qps, got = qps(dist.search, qs, batch)
                same = bool(np.array_equal(want[1], got[1]) and np.array_equal(want[0], got[0]))
                recall = recall_at_k(got[1], truth[: len(qs)], K)
                rows.append({"batch": batch, "gallery_qps": single_qps, "distributed_qps": dist_qps,
                             "same_ids_and_scores": same, "recall10": recall})
                print(f"batch {batch:>5}: Gallery {single_qps:8.0f} q/s | {len(placement)} shard actors "
                      f"{dist_qps:8.0f} q/s | same ids and scores: {same} | recall@10 {recall:.4f}", flush=True)
        finally:
            dist.close()
        result.update(search=rows, actor_nodes=placement, ray_version=ray.__version__)

    b, t = result["build_in_process"], result["build_tasks"]
    print()
    print_table([
        {"build": "one process (no Ray)", "wall s": f"{b['build_s']:.1f}", "driver peak RSS": gib(b["peak_rss"]),
         "worker peak RSS": "-", "where": "this process"},
        {"build": f"Ray tasks, 2 nodes × {args.node_cpus} CPU", "wall s": f"{t['build_s']:.1f}",
         "driver peak RSS": gib(t["driver_peak_rss"]), "worker peak RSS": gib(t["worker_peak_rss"]),
         "where": ", ".join(t["fill_nodes"])},
    ])
    print()
    print_table([{"batch": r["batch"], "Gallery q/s": f"{r['gallery_qps']:,.0f}",
                  "DistributedGallery q/s": f"{r['distributed_qps']:,.0f}", "same hits": r["same_ids_and_scores"],
                  "recall@10": f"{r['recall10']:.4f}", "exact q/s": f"{exact['qps']:.0f}"} for r in result["search"]])
    path = write_results(args.name, {**result, "machine_at_end": machine_info()})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
