"""The files of one manifest generation: loading shards, tombstones and metadata, writing the next.

Shared by ``Gallery`` and ``index.distributed``'s client and shard actors, so every reader
checks the same sha256s and every writer publishes the same generation layout (see
``gallery`` for the protocol: files are never rewritten, the manifest is written last).
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from reidscale import atomic
from reidscale.index import manifest as store
from reidscale.index.build import fill_shard, params_string
from reidscale.index.manifest import GalleryError
from reidscale.index.metric import faiss_metric
from reidscale.index.vectors import check_vectors


def load_shard(directory: Path, entry: dict, verify: bool = True, mmap: bool = False):
    """The FAISS index a manifest shard entry names, its sha256 checked (``verify``) before FAISS reads it.

    ``mmap``: map the file's codes and inverted lists instead of reading them
    (``IO_FLAG_MMAP_IFC | IO_FLAG_READ_ONLY``), so a process serves shards larger than its
    memory: what searches touch sits in the kernel's page cache, which it can evict, not in
    the process's own memory. The shard files are the ones ``write_index`` wrote; nothing is
    converted. Pinned on purpose: ``IO_FLAG_MMAP`` on an index merged by ``contrib.ondisk``
    (``OnDiskInvertedLists``) crashed on search with faiss 1.15, and needs a second file
    beside each shard; published shards are never rewritten (an atomic rename leaves an
    open mapping on the old inode), so a read-only mapping stays valid.
    """
    import faiss

    path = store.verified(directory, entry, verify=verify)
    index = faiss.read_index(str(path), faiss.IO_FLAG_MMAP_IFC | faiss.IO_FLAG_READ_ONLY if mmap else 0)
    if index.ntotal != entry["ntotal"]:
        raise GalleryError(f"{path}: ntotal {index.ntotal}, manifest says {entry['ntotal']}")
    return index


def load_tombstones(directory: Path, entries: list[dict], verify: bool = True) -> np.ndarray:
    """The sorted row ids the manifest's ``removed`` entries name (each file's sha256 checked)."""
    removed = [np.zeros(0, np.int64)]
    for entry in entries:
        path = store.verified(directory, entry, verify=verify)
        removed.append(np.load(path, allow_pickle=False).astype(np.int64))
    return np.sort(np.concatenate(removed))


def apply_search_params(shards: list, params: dict) -> None:
    """FAISS ``ParameterSpace`` settings (``{"nprobe": 16}``) on every index of ``shards``."""
    import faiss

    if params:
        text = params_string(params)
        for index in shards:
            faiss.ParameterSpace().set_index_parameters(index, text)


def read_metadata(directory: Path, manifest: dict, cache: dict | None = None, verify: bool = True) -> pa.Table:
    """row_id, identity, camera, path of every row the manifest names (built and added), sorted by row_id."""
    cache = {} if cache is None else cache

    def table(entry):
        key = (entry["file"], entry["sha256"])
        if key not in cache:
            path = store.verified(directory, entry, verify=verify)
            t = pq.read_table(path, columns=["row_id", "identity", "camera", "path"])
            if len(t) != entry["rows"]:
                raise GalleryError(f"{path}: {len(t)} rows, manifest says {entry['rows']}")
            cache[key] = t
        return cache[key]

    tables = [table(manifest["metadata"])] + [table(e["metadata"]) for e in manifest["shards"] if "metadata" in e]
    meta = pa.concat_tables(tables, promote_options="default") if len(tables) > 1 else tables[0]
    return meta.take(pc.sort_indices(meta, [("row_id", "ascending")]))


class Additions(NamedTuple):
    """Rows to add, checked: vectors N×D float32, identities int64, cameras int32, paths str (N each)."""

    vectors: np.ndarray
    identities: np.ndarray
    cameras: np.ndarray
    paths: list[str]


def checked_additions(vectors, identities, cameras, paths, dim: int, metric: str) -> Additions:
    """``Gallery.add``'s arguments as ``Additions``, or a ValueError saying which one is wrong."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n = len(vectors)
    if vectors.ndim != 2 or vectors.shape[1] != dim:
        raise ValueError(f"vectors must be N×{dim}, got {vectors.shape}")
    check_vectors(vectors, "added vectors", metric)
    identities = np.asarray(identities, dtype=np.int64).reshape(-1)
    if len(identities) != n:
        raise ValueError(f"{n} vectors but {len(identities)} identities")
    cameras = np.full(n, -1, np.int32) if cameras is None else np.asarray(cameras, dtype=np.int32).reshape(-1)
    paths = [""] * n if paths is None else [str(p) for p in paths]
    if len(cameras) != n or len(paths) != n:
        raise ValueError(f"{n} vectors but {len(cameras)} cameras and {len(paths)} paths")
    return Additions(vectors, identities, cameras, paths)


def trained_index(directory: Path, manifest: dict, verify: bool = True):
    """The trained, empty index every shard is a copy of (``trained.faiss``, sha256 checked)."""
    import faiss

    entry = manifest.get("trained")
    if entry:
        return faiss.read_index(str(store.verified(directory, entry, verify=verify)))
    empty = faiss.index_factory(int(manifest["dim"]), manifest["factory"], faiss_metric(manifest["metric"]))
    if not empty.is_trained:
        raise GalleryError(f"{directory}: no trained.faiss (built before add existed); rebuild to add")
    return empty


def with_added_shard(directory: Path, manifest: dict, rows: Additions, verify: bool = True) -> tuple[dict, np.ndarray]:
    """(the next generation's manifest, the new row ids): ``rows`` written as ``added-<gen>.faiss`` (a copy of
    the trained index) and ``added-<gen>.parquet``. Nothing is published; the caller holds the writer lock."""
    n = len(rows.vectors)
    gen = int(manifest.get("generation", 0)) + 1
    # format v1 (built before add/remove existed) has no next_row_id
    first = manifest.get("next_row_id", max(e["id_max"] for e in manifest["shards"] if e["id_max"] is not None) + 1)
    ids = np.arange(first, first + n, dtype=np.int64)
    index = fill_shard(trained_index(directory, manifest, verify), rows.vectors, ids)
    name = f"added-{gen:06d}"
    meta = pa.table({"row_id": ids, "identity": rows.identities, "camera": rows.cameras, "path": rows.paths})
    entry = {
        "file": f"{name}.faiss",
        "ntotal": int(index.ntotal),
        "id_min": int(ids[0]),
        "id_max": int(ids[-1]),
        "generation": gen,
        "sha256": store.write_index(index, directory / f"{name}.faiss"),
        "metadata": {"file": f"{name}.parquet", "rows": n,
                     "sha256": store.write_table(meta, directory / f"{name}.parquet")},
    }
    return {**manifest, "generation": gen, "shards": [*manifest["shards"], entry],
            "ntotal": int(manifest["ntotal"]) + n, "next_row_id": int(ids[-1]) + 1}, ids


def with_tombstones(directory: Path, manifest: dict, row_ids: np.ndarray) -> dict:
    """The next generation's manifest with ``row_ids`` (live, known) removed: ``removed-<gen>.npy``
    written. Nothing is published; the caller holds the writer lock."""
    gen = int(manifest.get("generation", 0)) + 1
    name = f"removed-{gen:06d}.npy"
    sha = atomic.write_file(directory / name, lambda tmp: _save_npy(tmp, row_ids), checksum=True)
    entry = {"file": name, "sha256": sha, "count": int(len(row_ids)), "generation": gen}
    return {**manifest, "generation": gen, "removed": [*manifest.get("removed", []), entry],
            "ntotal": int(manifest["ntotal"]) - len(row_ids)}


def _save_npy(path: Path, array: np.ndarray) -> None:
    # through a handle: np.save(<name>) would append ".npy" to the temporary's name
    with open(path, "wb") as fh:
        np.save(fh, array, allow_pickle=False)


class Snapshot:
    """Everything one manifest generation names, loaded; searches use one snapshot throughout."""

    def __init__(self, manifest: dict, shards: list, removed: np.ndarray, meta: pa.Table):
        self.manifest, self.shards, self.removed = manifest, shards, removed
        self.generation = int(manifest.get("generation", 0))
        self.row_ids = meta.column("row_id").to_numpy()
        self.identity = meta.column("identity").to_numpy()
        self.camera = meta.column("camera").to_numpy()
        self.path = meta.column("path")

    def positions(self, row_ids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(position in the metadata, found) for each row id; -1 and unknown ids are not found."""
        row_ids = np.asarray(row_ids, dtype=np.int64)
        pos = np.clip(np.searchsorted(self.row_ids, row_ids), 0, max(len(self.row_ids) - 1, 0))
        found = (row_ids >= 0) & (self.row_ids[pos] == row_ids) if len(self.row_ids) else np.zeros(row_ids.shape, bool)
        return pos, found

    def live_labels(self) -> tuple[np.ndarray, np.ndarray]:
        """(identity, camera) of every row a search can return (removed rows left out), in row-id order."""
        live = ~np.isin(self.row_ids, self.removed)
        return self.identity[live], self.camera[live]

    def identities(self, row_ids: np.ndarray) -> np.ndarray:
        pos, found = self.positions(row_ids)
        return np.where(found, self.identity[pos], -1) if len(self.identity) else np.full(np.shape(row_ids), -1)

    def cameras(self, row_ids: np.ndarray) -> np.ndarray:
        pos, found = self.positions(row_ids)
        return np.where(found, self.camera[pos], -1) if len(self.camera) else np.full(np.shape(row_ids), -1)

    def paths(self, row_ids: np.ndarray) -> np.ndarray:
        row_ids = np.asarray(row_ids)
        pos, found = self.positions(row_ids.reshape(-1))
        names = self.path.take(pa.array(pos)).to_numpy(zero_copy_only=False) if len(self.row_ids) else pos.astype(str)
        return np.where(found, names, "").reshape(row_ids.shape)
