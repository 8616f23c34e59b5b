"""Gallery index at 100k and 1M vectors: build time, peak memory, size on disk, queries/s, recall.

    python bench/index_scale.py                              # 100k + 1M (512-d) + the demo model at 1M
    python bench/index_scale.py --sizes 100000 --demo-size 0 # quick

Galleries (cached under runs/bench/index_scale/, generated once):

* ``synthetic-512``: identity structure like real ReID embeddings. Identity centres are
  Gaussian with a power-law spectrum (variance of the k-th principal direction ∝ k^-1.5,
  so ~90% of the variance sits in ~60 of 512 directions, as in PCA of trained ReID
  features), randomly rotated, L2-normalised; each image is its centre + isotropic noise
  of norm 0.6, L2-normalised (same-identity cosine ≈ 0.74); images per identity are
  log-normal, median 5 (2-30). Queries are further images of gallery identities.
* ``demo-128``: the trained demo model (runs/demo/models/trained, 128-d tiny ViT) embeds
  images of the synthetic person generator (128×64 renders, as in the demo data); queries
  are the generator's query images (other views of gallery identities).

Every configuration runs in its own spawned process (build from the .npy, then open the
index from disk as a reader would and search), so its peak RSS is its own (it includes the
memory-mapped input vectors the build reads). Queries/s: all queries in one batch through
``Gallery.search``, FAISS's default OpenMP threads (all cores), best of 2 after a warm-up.
The exact baseline is the ``Flat`` row: a FAISS ``IndexFlatIP`` over the same vectors (in
an ``IndexIDMap2``), searched the same way (BLAS matrix products), so "× exact" compares
like with like. Recall is against exact top-k computed separately with numpy (brute
force): recall@k = |top-k ∩ exact top-k| / k, averaged over queries. The 1-minute load
average before each configuration is recorded (other jobs may share the cores).
Writes bench/results/index_scale.json.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import time
from pathlib import Path

import numpy as np

from _common import gib, machine_info, print_table, run_isolated, write_results

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / "runs" / "bench" / "index_scale"
K = 10


# ---------------------------------------------------------------------------- data
def synthetic_embeddings(out: Path, n: int, dim: int, n_queries: int, seed: int = 0, alpha: float = 0.75,
                         noise: float = 0.6, median_images: float = 5.0, chunk: int = 1 << 16) -> None:
    """Write gallery.npy (+ gallery.parquet metadata), queries.npy, query_identity.npy into ``out``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    counts = np.clip(np.round(np.exp(rng.normal(np.log(median_images), 0.4, n))), 2, 30).astype(np.int64)
    n_ids = int(np.searchsorted(np.cumsum(counts), n)) + 1
    counts = counts[:n_ids]
    counts[-1] -= counts.sum() - n
    identity = np.repeat(np.arange(n_ids, dtype=np.int64), counts)
    spectrum = (np.arange(1, dim + 1) ** -alpha).astype(np.float32)
    rotation, _ = np.linalg.qr(rng.standard_normal((dim, dim)).astype(np.float32))
    centres = (rng.standard_normal((n_ids, dim), dtype=np.float32) * spectrum) @ rotation.T
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)

    def images(idents: np.ndarray, target: np.ndarray) -> None:
        for lo in range(0, len(idents), chunk):
            x = rng.standard_normal((len(idents[lo : lo + chunk]), dim), dtype=np.float32) * (noise / np.sqrt(dim))
            x += centres[idents[lo : lo + chunk]]
            target[lo : lo + chunk] = x / np.linalg.norm(x, axis=1, keepdims=True)

    out.mkdir(parents=True, exist_ok=True)
    gallery = np.lib.format.open_memmap(out / "gallery.tmp.npy", "w+", np.float32, (n, dim))
    images(identity, gallery)
    gallery.flush()
    del gallery
    q_ident = rng.choice(n_ids, n_queries, replace=False)
    queries = np.empty((n_queries, dim), np.float32)
    images(q_ident, queries)
    np.save(out / "queries.npy", queries)
    np.save(out / "query_identity.npy", q_ident)
    pq.write_table(pa.table({"row_id": np.arange(n, dtype=np.int64), "identity": identity,
                             "camera": np.zeros(n, np.int32), "path": pa.array([""] * n)}), out / "gallery.parquet")
    (out / "gallery.tmp.npy").replace(out / "gallery.npy")


def _demo_part(model_dir: str, part: int, n: int, n_queries: int, out: str) -> None:
    """One process's share of the demo gallery: render, JPEG, decode, embed (1 torch thread)."""
    import torch

    from reidscale.data.sources.synthetic import SyntheticConfig, generate
    from reidscale.embed import embed_images

    torch.set_num_threads(1)
    cfg = SyntheticConfig(num_identities=10 * n, train_fraction=1e-6, height=128, width=64, seed=1000 + part,
                          max_query_cameras=1)
    rng = np.random.default_rng(part)
    keep_query = n_queries / (n / 10)  # ~10 gallery images per identity, one query each
    g_raw, g_ident, g_cam, q_raw, q_ident = [], [], [], [], []
    vectors, done = [], 0
    t0 = time.time()
    for rec in generate(cfg):
        if rec["split"] == "gallery":
            g_raw.append(rec["image"])
            g_ident.append(rec["identity"] + part * 10**8)
            g_cam.append(rec["camera"] + part * 100)
        elif rec["split"] == "query" and len(q_raw) < n_queries and rng.random() < keep_query:
            q_raw.append(rec["image"])
            q_ident.append(rec["identity"] + part * 10**8)
        if len(g_raw) == 8192 or done + len(g_raw) >= n:
            g_raw = g_raw[: n - done]
            vectors.append(embed_images(model_dir, g_raw)[0])
            done += len(g_raw)
            g_raw = []
            if part == 0 and len(vectors) % 10 == 0:
                print(f"  demo gallery part 0: {done}/{n} images, {done / (time.time() - t0):.0f} img/s", flush=True)
            if done >= n:
                break
    np.save(f"{out}/part{part}-gallery.npy", np.concatenate(vectors))
    np.save(f"{out}/part{part}-identity.npy", np.asarray(g_ident[:n], np.int64))
    np.save(f"{out}/part{part}-camera.npy", np.asarray(g_cam[:n], np.int32))
    np.save(f"{out}/part{part}-queries.npy", embed_images(model_dir, q_raw)[0])
    np.save(f"{out}/part{part}-query_identity.npy", np.asarray(q_ident, np.int64))


def demo_embeddings(out: Path, model_dir: Path, n: int, n_queries: int) -> None:
    """The demo model's embeddings of ``n`` gallery images (two processes, one per core)."""
    import multiprocessing as mp

    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    halves = [n // 2, n - n // 2]
    with mp.get_context("spawn").Pool(2) as pool:
        pool.starmap(_demo_part, [(str(model_dir), p, halves[p], n_queries // 2 + p * (n_queries % 2), str(out))
                                  for p in range(2)])
    load = lambda name: np.concatenate([np.load(out / f"part{p}-{name}.npy") for p in range(2)])
    gallery, identity = load("gallery"), load("identity")
    pq.write_table(pa.table({"row_id": np.arange(n, dtype=np.int64), "identity": identity,
                             "camera": load("camera"), "path": pa.array([""] * n)}), out / "gallery.parquet")
    np.save(out / "queries.npy", load("queries"))
    np.save(out / "query_identity.npy", load("query_identity"))
    np.save(out / "gallery.tmp.npy", gallery)
    (out / "gallery.tmp.npy").replace(out / "gallery.npy")
    for f in out.glob("part*.npy"):
        f.unlink()


def exact_topk(data: str, k: int = K, chunk: int = 1 << 16) -> None:
    """Brute-force numpy ground truth: exact_ids.npy / exact_scores.npy (Q×k) beside the data."""
    g = np.load(f"{data}/gallery.npy", mmap_mode="r")
    q = np.load(f"{data}/queries.npy")
    best_s = np.full((len(q), 0), -np.inf, np.float32)
    best_i = np.zeros((len(q), 0), np.int64)
    for lo in range(0, len(g), chunk):
        sims = q @ np.asarray(g[lo : lo + chunk]).T
        part = np.argpartition(-sims, k - 1, axis=1)[:, :k] if sims.shape[1] > k else np.tile(np.arange(sims.shape[1]), (len(q), 1))
        best_s = np.concatenate([best_s, np.take_along_axis(sims, part, 1)], axis=1)
        best_i = np.concatenate([best_i, part + lo], axis=1)
        order = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(best_s, order, 1), np.take_along_axis(best_i, order, 1)
    np.save(f"{data}/exact_ids.npy", best_i)
    np.save(f"{data}/exact_scores.npy", best_s)


# ---------------------------------------------------------------------------- one configuration
def measure(data: str, index_dir: str, factory: str, search_params: dict, num_shards: int, repeats: int = 2) -> dict:
    """Runs in a child process: build from the .npy, reopen from disk, search all queries, score."""
    import pyarrow.parquet as pq

    from reidscale.index.build import build_index
    from reidscale.index.gallery import Gallery

    shutil.rmtree(index_dir, ignore_errors=True)
    vectors = np.load(f"{data}/gallery.npy", mmap_mode="r")
    meta = pq.read_table(f"{data}/gallery.parquet")
    t0 = time.perf_counter()
    manifest = build_index(vectors, meta, index_dir, factory=factory, num_shards=num_shards,
                           search_params=search_params or None, log=lambda *_: None)
    build_s = time.perf_counter() - t0
    del vectors, meta
    gc.collect()

    t0 = time.perf_counter()
    gallery = Gallery(index_dir)
    load_s = time.perf_counter() - t0
    queries = np.load(f"{data}/queries.npy")
    gallery.search(queries[:64], K)  # warm-up
    best = np.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        _, ids = gallery.search(queries, K)
        best = min(best, time.perf_counter() - t0)
    exact = np.load(f"{data}/exact_ids.npy")
    recall10 = float(np.mean([len(np.intersect1d(a, b)) / K for a, b in zip(ids, exact)]))
    q_ident = np.load(f"{data}/query_identity.npy")
    files = [e["file"] for e in manifest["shards"]] + [manifest["trained"]["file"]]
    return {
        "factory": manifest["factory"],
        "search": manifest["search"],
        "num_shards": num_shards,
        "build_s": build_s,
        "load_s": load_s,
        "index_bytes": sum((Path(index_dir) / f).stat().st_size for f in files),
        "metadata_bytes": (Path(index_dir) / manifest["metadata"]["file"]).stat().st_size,
        "queries": len(queries),
        "search_s": best,
        "qps": len(queries) / best,
        "recall1": float(np.mean(ids[:, 0] == exact[:, 0])),
        "recall10": recall10,
        "identity_rank1": float(np.mean(gallery.identities(ids[:, 0]) == q_ident)),
    }


def configurations(n: int, dim: int, hnsw_max: int) -> list[tuple[str, str, dict, int]]:
    """(label, factory, search params, shards): exact, the automatic choice, and the alternatives."""
    from reidscale.index.build import _nlist, choose_factory, default_search_params

    nlist = _nlist(n)
    auto = choose_factory(n, dim)
    ivfpq = auto if auto != "Flat" else f"IVF{nlist},PQ{dim // 2}x4fs,RFlat"
    rows = [("exact (Flat)", "Flat", {}, 1),
            (f"IVF-PQ + re-rank{' (auto)' if ivfpq == auto else ''}", ivfpq, {}, 1),
            ("IVF-PQ + re-rank, 4 shards", ivfpq, {}, 4),
            ("IVF-Flat", f"IVF{nlist},Flat", default_search_params(f"IVF{nlist},Flat", n), 1)]
    if auto == "Flat":
        rows[0] = ("exact (Flat) (auto)", "Flat", {}, 1)
    if n <= hnsw_max:
        rows.append(("HNSW32", "HNSW32", {}, 1))
    return rows


# ---------------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100000,1000000", help="synthetic 512-d gallery sizes")
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--queries", type=int, default=2000)
    parser.add_argument("--demo-size", type=int, default=1_000_000, help="demo-model gallery size (0: skip)")
    parser.add_argument("--demo-model", default=str(REPO / "runs" / "demo" / "models" / "trained"))
    parser.add_argument("--hnsw-max", type=int, default=100_000, help="largest gallery to build HNSW32 for")
    parser.add_argument("--work", default=str(WORK), help="cached galleries and built indexes")
    parser.add_argument("--keep-indexes", action="store_true")
    parser.add_argument("--name", default="index_scale")
    args = parser.parse_args()
    work = Path(args.work)

    datasets = []
    for n in [int(s) for s in args.sizes.split(",") if s]:
        data = work / f"synthetic-{args.dim}-{n}-q{args.queries}"
        if not (data / "gallery.npy").is_file():
            print(f"generating {data.name} ...", flush=True)
            run_isolated(synthetic_embeddings, data, n, args.dim, args.queries)
        datasets.append((f"synthetic-{args.dim}", n, args.dim, data))
    skipped = None
    if args.demo_size:
        model = Path(args.demo_model)
        if not (model / "config.json").is_file():
            skipped = f"demo model: {model} has no exported model (run `make demo`); row skipped"
            print(skipped, flush=True)
        else:
            sha = json.loads((model / "config.json").read_text())["weights_sha256"][:12]
            data = work / f"demo-{sha}-{args.demo_size}-q{args.queries}"
            if not (data / "gallery.npy").is_file():
                print(f"embedding {args.demo_size} rendered images with {model} (one-off, cached in {data}) ...",
                      flush=True)
                t0 = time.time()
                demo_embeddings(data, model, args.demo_size, args.queries)
                print(f"  done in {time.time() - t0:.0f}s", flush=True)
            dim = int(np.load(data / "queries.npy", mmap_mode="r").shape[1])
            datasets.append((f"demo model ({dim}-d)", args.demo_size, dim, data))

    rows = []
    for source, n, dim, data in datasets:
        if not (data / "exact_ids.npy").is_file():
            run_isolated(exact_topk, str(data))
        for label, factory, params, shards in configurations(n, dim, args.hnsw_max):
            index_dir = work / "indexes" / f"{data.name}-{factory.replace(',', '_')}-s{shards}"
            load = os.getloadavg()[0]
            print(f"{source} n={n:,}: {label} [{factory}] (load average {load:.1f}) ...", flush=True)
            result, peak = run_isolated(measure, str(data), str(index_dir), factory, params, shards)
            if not args.keep_indexes:
                shutil.rmtree(index_dir, ignore_errors=True)
            rows.append({"source": source, "n": n, "dim": dim, "config": label, **result, "peak_rss_bytes": peak,
                         "load_1min_before": round(load, 2)})
            print(f"  build {result['build_s']:.1f}s  {result['qps']:.0f} q/s  recall@10 {result['recall10']:.4f}  "
                  f"peak {gib(peak)}", flush=True)

    for row in rows:
        exact = next(r for r in rows if r["source"] == row["source"] and r["n"] == row["n"] and r["factory"] == "Flat")
        row["speedup_vs_exact"] = row["qps"] / exact["qps"]
    table = [{
        "gallery": f"{r['source']}, {r['n']:,}",
        "index": r["config"],
        "factory / search": f"{r['factory']} {','.join(f'{k}={v}' for k, v in sorted(r['search'].items()))}".strip(),
        "build s": f"{r['build_s']:.1f}",
        "peak RSS": gib(r["peak_rss_bytes"]),
        "on disk": gib(r["index_bytes"]),
        "queries/s": f"{r['qps']:,.0f}",
        "× exact": f"{r['speedup_vs_exact']:.1f}",
        "recall@1": f"{r['recall1']:.4f}",
        "recall@10": f"{r['recall10']:.4f}",
        "identity rank-1": f"{r['identity_rank1']:.4f}",
        "load": f"{r['load_1min_before']:.1f}",
    } for r in rows]
    print()
    print_table(table)
    targets = []
    for r in rows:
        if r["n"] >= 1_000_000 and "(auto)" in r["config"]:
            ok = r["recall10"] >= 0.95 and r["speedup_vs_exact"] >= 20 and r["peak_rss_bytes"] < 8e9
            targets.append({"gallery": f"{r['source']}, {r['n']:,}", "recall10": r["recall10"],
                            "speedup_vs_exact": r["speedup_vs_exact"], "peak_rss_bytes": r["peak_rss_bytes"],
                            "met": ok})
            print(f"target at {r['n']:,} ({r['source']}): recall@10 {r['recall10']:.4f} (>= 0.95), "
                  f"{r['speedup_vs_exact']:.1f}x exact q/s (>= 20), peak {r['peak_rss_bytes'] / 1e9:.2f} GB (< 8): "
                  f"{'met' if ok else 'MISSED'}")
    if skipped:
        print(skipped)
    path = write_results(args.name, {"k": K, "rows": rows, "targets": targets, "skipped": skipped,
                                     "machine_at_end": machine_info()})
    print(f"results: {path}")


if __name__ == "__main__":
    main()
