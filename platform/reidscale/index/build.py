"""Build a sharded FAISS gallery index from embedding vectors.

Output directory::

    shard-00000.faiss ...    one FAISS index per shard, ids = int64 gallery row ids
    metadata.parquet         row_id, identity, camera, path (never inside FAISS)
    manifest.json            written last: model hash, dim, metric, factory, per-shard
                             ntotal, id range and sha256

Every file is written under a temporary name and renamed; a directory without a
manifest is an unfinished build, and ``Gallery`` refuses it.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reidscale.data.shards import atomic_write_json, sha256_file

INDEX_FORMAT = "reidscale-index-v1"


def choose_factory(n: int, dim: int, memory_budget_bytes: int = 8 << 30) -> str:
    """Exact search while it is cheap; IVF above, compressed (PQ) when vectors outgrow memory."""
    if n <= 200_000:
        return "Flat"
    nlist = int(4 * np.sqrt(n))
    nlist = 1 << int(np.log2(nlist))
    if n * dim * 4 <= memory_budget_bytes // 2:
        return f"IVF{nlist},Flat"
    m = next(m for m in (64, 32, 16, 8) if dim % m == 0)
    return f"IVF{nlist},PQ{m}"


def _metric(metric: str) -> int:
    import faiss

    return {"ip": faiss.METRIC_INNER_PRODUCT, "l2": faiss.METRIC_L2}[metric]


def build_shard(vectors: np.ndarray, ids: np.ndarray, factory: str, metric: str):
    import faiss

    index = faiss.index_factory(vectors.shape[1], factory, _metric(metric))
    if not index.is_trained:
        index.train(vectors)
    wrapped = faiss.IndexIDMap2(index)
    wrapped.add_with_ids(vectors, ids.astype(np.int64))
    return wrapped


def write_index_atomic(index, path: Path) -> None:
    import faiss

    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    faiss.write_index(index, str(tmp))
    os.replace(tmp, path)


def build_index(
    vectors: np.ndarray,
    metadata: pa.Table,
    out_dir: str | Path,
    *,
    factory: str = "auto",
    metric: str = "ip",
    num_shards: int = 1,
    model_sha256: str = "",
    extra: dict | None = None,
) -> dict:
    """Build ``num_shards`` shards over rows in ``metadata`` order; return the manifest.

    ``vectors`` (N×D float32) row i belongs to ``metadata`` row i, whose ``row_id`` is
    the id stored in FAISS. Shards already complete from an interrupted build with the
    same inputs are kept (their file sha256 is checked against a partial manifest).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n, dim = vectors.shape
    if len(metadata) != n:
        raise ValueError(f"{n} vectors but {len(metadata)} metadata rows")
    if factory == "auto":
        factory = choose_factory(n, dim)
    ids = metadata.column("row_id").to_numpy().astype(np.int64)
    if len(np.unique(ids)) != n:
        raise ValueError("row_id values are not unique")
    t0 = time.time()
    bounds = np.linspace(0, n, num_shards + 1).astype(int)
    partial_path = out_dir / "manifest.partial.json"
    done = {}
    if partial_path.exists():
        import json

        partial = json.loads(partial_path.read_text())
        if partial.get("model_sha256") == model_sha256 and partial.get("factory") == factory and partial.get("n") == n:
            done = {s["file"]: s for s in partial["shards"]}
    (out_dir / "manifest.json").unlink(missing_ok=True)
    shard_entries = []
    for s in range(num_shards):
        lo, hi = bounds[s], bounds[s + 1]
        name = f"shard-{s:05d}.faiss"
        path = out_dir / name
        prev = done.get(name)
        if prev and path.exists() and sha256_file(path) == prev["sha256"]:
            shard_entries.append(prev)
            continue
        index = build_shard(np.ascontiguousarray(vectors[lo:hi]), ids[lo:hi], factory, metric)
        write_index_atomic(index, path)
        entry = {
            "file": name,
            "ntotal": int(index.ntotal),
            "id_min": int(ids[lo:hi].min()) if hi > lo else None,
            "id_max": int(ids[lo:hi].max()) if hi > lo else None,
            "sha256": sha256_file(path),
        }
        shard_entries.append(entry)
        atomic_write_json(partial_path, {"model_sha256": model_sha256, "factory": factory, "n": n,
                                         "shards": shard_entries})
    meta_path = out_dir / "metadata.parquet"
    tmp = meta_path.with_name(f".{meta_path.name}.tmp")
    pq.write_table(metadata, tmp)
    os.replace(tmp, meta_path)
    manifest = {
        "format": INDEX_FORMAT,
        "dim": int(dim),
        "metric": metric,
        "factory": factory,
        "ntotal": int(n),
        "model_sha256": model_sha256,
        "shards": shard_entries,
        "metadata": {"file": meta_path.name, "sha256": sha256_file(meta_path), "rows": len(metadata)},
        "build_time_s": time.time() - t0,
        **(extra or {}),
    }
    atomic_write_json(out_dir / "manifest.json", manifest)
    partial_path.unlink(missing_ok=True)
    return manifest
