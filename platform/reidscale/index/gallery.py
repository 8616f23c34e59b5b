"""``Gallery``: open a built index, search every shard, merge, add and remove identities.

A gallery directory (see ``build`` and ``manifest``) changes only by publishing a new
manifest generation:

* ``add`` writes ``added-<gen>.faiss`` (a copy of the trained, empty index holding the
  new vectors under new row ids) and ``added-<gen>.parquet`` (their metadata);
* ``remove`` writes ``removed-<gen>.npy`` (the row ids removed in that generation,
  tombstones filtered out of every search);
* then the manifest naming all files of generation ``gen`` replaces the old one.

Published files are never rewritten or deleted, so a reader that opened generation g
keeps searching g, consistently, until it calls ``refresh()``; a reader that opens the
directory during a write sees g or g+1 whole, never a mixture.
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Sequence

import numpy as np
import pyarrow as pa

from reidscale import atomic
from reidscale.index import manifest as store
from reidscale.index.generation import (Snapshot, apply_search_params, checked_additions, load_shard, load_tombstones,
                                        read_metadata, with_added_shard, with_tombstones)
from reidscale.index.hits import live_hits, merge_topk, search_live, top_identities
from reidscale.index.manifest import GalleryError
from reidscale.index.metric import larger_is_closer
from reidscale.index.vectors import check_vectors
from reidscale.models import exported

# merge_topk and the other hit functions live in index.hits; merge_topk stays importable from here
__all__ = ["Gallery", "GalleryError", "merge_topk"]

log = logging.getLogger(__name__)


class Gallery:
    """A sharded FAISS gallery on disk: ``search``, ``add``, ``remove``, ids → identities.

    ``verify`` checks every file's sha256 against the manifest before FAISS reads it.
    ``search_params`` (e.g. ``{"nprobe": 64}``) override the manifest's search-time
    settings. ``use_gpu``: "auto" moves shards to all GPUs when FAISS sees any (index
    types FAISS cannot run on GPU stay on CPU). ``threads``: shards searched at once
    (default: min(shards, CPUs)). ``mmap``: shards memory-mapped from disk instead of read
    into memory (``generation.load_shard``): for galleries larger than this machine's memory.
    """

    def __init__(self, directory: str | Path, *, verify: bool = True, threads: int = 0,
                 search_params: dict | None = None, use_gpu: str = "auto", manifest: dict | None = None,
                 mmap: bool = False):
        self.directory = Path(directory)
        self.verify, self.mmap = verify, mmap
        self._threads = threads
        self._search_override = dict(search_params or {})
        self._use_gpu = use_gpu
        self._loaded: dict[tuple[str, str], object] = {}  # (file, sha256) → index: files are immutable
        self._tables: dict[tuple[str, str], pa.Table] = {}
        self._write_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._pool_workers = 1
        # manifest: the build opens its not yet published manifest to calibrate it
        self._snap = self._open(manifest if manifest is not None else store.read_manifest(self.directory))

    # ------------------------------------------------------------------ loading
    def _open(self, manifest: dict) -> Snapshot:
        import faiss

        shards = []
        for entry in manifest["shards"]:
            key = (entry["file"], entry["sha256"])
            if key not in self._loaded:
                self._loaded[key] = self._to_device(load_shard(self.directory, entry, self.verify, self.mmap))
            shards.append(self._loaded[key])
        # set on every shard each time, not only on first load: a new generation may carry
        # recalibrated settings for shards already loaded (they are shared across generations)
        self._apply_params(shards, {**manifest.get("search", {}), **self._search_override})
        removed = load_tombstones(self.directory, manifest.get("removed", []), self.verify)
        meta = read_metadata(self.directory, manifest, self._tables, self.verify)
        snap = Snapshot(manifest, shards, removed, meta)
        workers = self._threads or min(len(shards), os.cpu_count() or 1)
        if workers > 1 and workers != self._pool_workers:
            # each worker thread gets its share of the cores for FAISS's own OpenMP loops
            omp = max(1, (os.cpu_count() or 1) // workers)
            if self._pool is not None:
                self._pool.shutdown(wait=False)
            self._pool = ThreadPoolExecutor(max_workers=workers, initializer=lambda: faiss.omp_set_num_threads(omp))
            self._pool_workers = workers
        return snap

    _apply_params = staticmethod(apply_search_params)

    def _to_device(self, index):
        import faiss

        if self._use_gpu == "false" or faiss.get_num_gpus() == 0:
            return index
        try:
            return faiss.index_cpu_to_all_gpus(index)
        except (RuntimeError, AttributeError):  # e.g. fast-scan PQ or HNSW have no GPU version
            return index

    def refresh(self) -> bool:
        """Load the newest published generation if another writer made one; True if it changed."""
        manifest = store.read_manifest(self.directory)
        if int(manifest.get("generation", 0)) == self._snap.generation:
            return False
        self._snap = self._open(manifest)
        return True

    # ------------------------------------------------------------------ reading
    @property
    def manifest(self) -> dict:
        return self._snap.manifest

    @property
    def generation(self) -> int:
        return self._snap.generation

    @property
    def metric(self) -> str:
        return self._snap.manifest["metric"]

    @property
    def dim(self) -> int:
        return int(self._snap.manifest["dim"])

    @property
    def shards(self) -> list:
        return list(self._snap.shards)

    @property
    def ntotal(self) -> int:
        """Vectors a search can return (removed ones excluded)."""
        return sum(s.ntotal for s in self._snap.shards) - len(self._snap.removed)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores Q×k, row ids Q×k), best first, over all shards; removed rows never appear.

        Scores are inner products (metric ip; cosine for L2-normalised vectors: give
        normalised queries) or squared L2 distances (l2). Fewer than k hits pad with
        id -1 and score -inf (ip) / +inf (l2).
        """
        snap = self._snap
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be Q×{self.dim}, got {queries.shape}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        check_vectors(queries, "queries", self.metric)
        larger = larger_is_closer(snap.manifest["metric"])
        return search_live(lambda q, fetch: self._search_shards(snap, q, fetch, larger), len(snap.removed), queries,
                           k, larger)

    def _search_shards(self, snap: Snapshot, queries: np.ndarray, k: int, larger: bool) -> list:
        def one(index):
            return live_hits(*index.search(queries, k), snap.removed, larger)

        if len(snap.shards) == 1 or self._pool is None:
            return [one(index) for index in snap.shards]
        return list(self._pool.map(one, snap.shards))

    def search_identities(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Top-k distinct identities per query: (identities, best score, best row id), each Q×k.

        An identity's score is that of its best image; pads with identity -1.
        """
        return top_identities(self, queries, k)

    def live_labels(self) -> tuple[np.ndarray, np.ndarray]:
        """(identity, camera) of every row a search can return now (removed rows left out), in row-id order."""
        return self._snap.live_labels()

    def identities(self, row_ids: np.ndarray) -> np.ndarray:
        """Identity for each row id (-1 where the id is -1, i.e. no hit, or unknown)."""
        return self._snap.identities(row_ids)

    def cameras(self, row_ids: np.ndarray) -> np.ndarray:
        return self._snap.cameras(row_ids)

    def paths(self, row_ids: np.ndarray) -> np.ndarray:
        """Source path per row id ("" where unknown), same shape as ``row_ids``."""
        return self._snap.paths(row_ids)

    # ------------------------------------------------------------------ writing
    def add(self, vectors: np.ndarray | None = None, identities: Sequence[int] | np.ndarray = (), cameras=None,
            paths: Sequence[str] | None = None, *, images: Sequence[str | bytes] | None = None,
            model_dir: str | Path | None = None) -> np.ndarray:
        """Add new images of (new or known) identities without rebuilding; return their row ids.

        Give ``vectors`` (N×D float32, L2-normalised like the gallery) or ``images`` (file
        paths or encoded bytes), which are embedded with the model the index was built
        with (``model_dir`` overrides where it lives; its weights must hash to the
        manifest's ``model_sha256``). The new vectors go into a new shard built from the
        same trained index, published with a new manifest generation.
        """
        vectors, paths = vectors_to_add(self.directory, self.manifest, vectors, images, cameras, paths, model_dir)
        rows = checked_additions(vectors, identities, cameras, paths, self.dim, self.metric)
        if not len(rows.vectors):
            return np.zeros(0, np.int64)
        with self._write_lock, store.writer_lock(self.directory):
            manifest, ids = with_added_shard(self.directory, self._latest(), rows, self.verify)
            self._publish(manifest)
            cal = manifest.get("calibration")
            if cal and manifest["next_row_id"] - cal["next_row_id"] > cal["recalibrate_fraction"] * cal["ntotal"]:
                # enough new rows that the measured recall no longer describes this gallery
                try:
                    self._calibrate_locked(manifest, None, None)
                except GalleryError as exc:
                    log.warning("%s: not recalibrated after add: %s", self.directory, exc)
        return ids

    def calibrate(self, queries: np.ndarray | None = None, spec=None) -> dict:
        """Re-measure the search settings on this gallery (see ``reidscale.index.calibrate``) and
        publish them in a new manifest generation; return the calibration report.

        ``queries``: the user's query vectors; default one live gallery row per sampled identity.
        ``spec`` (``CalibrationSpec``): default the one of the last calibration (or the defaults).
        Ground truth is exact search over the vectors the shards store (Flat, RFlat re-ranking,
        HNSW storage); an index without exact vectors (PQ only, SQ8) raises ``GalleryError``.
        While it runs, other threads searching through this same object see the settings being
        tried (FAISS keeps them on the shared index objects); other processes are unaffected.
        """
        with self._write_lock, store.writer_lock(self.directory):
            return self._calibrate_locked(self._latest(), queries, spec)

    def _calibrate_locked(self, manifest: dict, queries, spec) -> dict:
        from reidscale.index.calibrate import CalibrationSpec

        if spec is None:
            old = manifest.get("calibration") or {}
            spec = CalibrationSpec(**{f: old[f] for f in CalibrationSpec.__dataclass_fields__ if f in old})
        report = self.measure_settings(self._exact_chunks(), spec, queries=queries)
        gen = int(manifest.get("generation", 0)) + 1
        self._publish({**manifest, "generation": gen, "search": report["chosen"],
                       "calibration": {**report, "generation": gen}})
        return report

    def measure_settings(self, chunks: list, spec, *, queries: np.ndarray | None = None,
                         budget_bytes: int | None = None) -> dict:
        """The calibration report for this gallery (nothing published); leaves its settings as they were.

        ``chunks``: ``[(vectors, row ids)]`` covering the live gallery, the exact ground truth.
        Without ``queries``, one row of each of ``spec.sample`` identities (seed ``spec.seed``,
        see ``sample_query_rows``) are the queries, each one's own row excluded from its results.
        """
        from reidscale.index.calibrate import calibrate_settings, drop_self, exact_topk, sample_query_rows

        spec.validate()
        snap = self._snap
        self_ids = None
        if queries is None:
            sizes = np.cumsum([0] + [len(ids) for _, ids in chunks])
            all_ids = np.concatenate([np.asarray(ids, np.int64) for _, ids in chunks])
            pos = sample_query_rows(self.identities(all_ids), spec.sample, spec.seed)
            which = np.searchsorted(sizes, pos, side="right") - 1
            queries = np.concatenate([np.asarray(chunks[c][0][pos[which == c] - sizes[c]], np.float32)
                                      for c in range(len(chunks))])
            self_ids = np.concatenate([np.asarray(chunks[c][1])[pos[which == c] - sizes[c]] for c in range(len(chunks))])
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"calibration queries must be Q×{self.dim}, got {queries.shape}")
        check_vectors(queries, "calibration queries", self.metric)
        fetch = spec.recall_k + (self_ids is not None)
        _, truth = exact_topk(chunks, queries, fetch, self.metric)
        truth = drop_self(truth, self_ids, spec.recall_k)

        def search(q, k, params):
            self._apply_params(snap.shards, params)
            return self.search(q, k)[1]

        try:
            report = calibrate_settings(search, queries, truth, snap.manifest["factory"], spec, self_ids=self_ids,
                                        budget_bytes=budget_bytes or snap.manifest.get("memory_budget_bytes"))
        finally:
            self._apply_params(snap.shards, {**snap.manifest.get("search", {}), **self._search_override})
        return {**report, "ntotal": int(self.ntotal), "next_row_id": int(snap.manifest.get("next_row_id", 0))}

    def _exact_chunks(self) -> list[tuple[np.ndarray, np.ndarray]]:
        """(vectors, row ids) of the live rows, read from the exact vectors the shards keep."""
        import faiss

        snap, chunks = self._snap, []
        for shard in snap.shards:
            idmap = faiss.downcast_index(shard)
            inner = faiss.downcast_index(idmap.index)
            if isinstance(inner, faiss.IndexRefine):
                inner = faiss.downcast_index(inner.refine_index)
            elif isinstance(inner, faiss.IndexHNSW):
                inner = faiss.downcast_index(inner.storage)
            if not isinstance(inner, faiss.IndexFlat):
                raise GalleryError(f"{self.directory}: {snap.manifest['factory']} keeps no exact vectors to measure "
                                   "recall against; calibrate with Gallery.measure_settings and the gallery's vectors")
            n = inner.ntotal
            vectors = faiss.rev_swig_ptr(inner.get_xb(), n * self.dim).reshape(n, self.dim) if n else \
                np.zeros((0, self.dim), np.float32)
            ids = faiss.vector_to_array(idmap.id_map).astype(np.int64)
            live = ~np.isin(ids, snap.removed)
            chunks.append((vectors if live.all() else vectors[live], ids if live.all() else ids[live]))
        return chunks

    def remove(self, row_ids: Sequence[int] | np.ndarray) -> int:
        """Remove rows by id (unknown or already removed ids are ignored); return how many were removed."""
        row_ids = np.unique(np.asarray(row_ids, dtype=np.int64).reshape(-1))
        with self._write_lock, store.writer_lock(self.directory):
            manifest = self._latest()
            _, found = self._snap.positions(row_ids)
            new = row_ids[found & ~np.isin(row_ids, self._snap.removed)]
            if not len(new):
                return 0
            self._publish(with_tombstones(self.directory, manifest, new))
        return int(len(new))

    def _latest(self) -> dict:
        """The published manifest (under the writer lock), this object brought up to date with it."""
        manifest = store.read_manifest(self.directory)
        if "next_row_id" not in manifest:  # format v1: built before add/remove existed
            manifest["next_row_id"] = int(max(e["id_max"] for e in manifest["shards"] if e["id_max"] is not None)) + 1
        if int(manifest.get("generation", 0)) != self._snap.generation:
            self._snap = self._open(manifest)
        return manifest

    def _publish(self, manifest: dict) -> None:
        manifest["format"] = store.INDEX_FORMAT
        snap = self._open(manifest)  # load (and check) before publishing: never publish what we cannot read
        atomic.write_json(self.directory / store.MANIFEST, manifest)
        self._snap = snap

    def resolve_model_dir(self, model_dir: str | Path | None = None) -> Path:
        """The embedding model of this index (see ``resolve_model_dir``)."""
        return resolve_model_dir(self.directory, self.manifest, model_dir)


def vectors_to_add(index_dir: Path, manifest: dict, vectors, images, cameras, paths, model_dir) -> tuple:
    """(vectors, paths) of an ``add``: the ``vectors`` given, or ``images`` embedded with the index's
    model (``resolve_model_dir``); images that do not decode refuse the whole add."""
    if (vectors is None) == (images is None):
        raise ValueError("give exactly one of vectors or images")
    if images is None:
        return vectors, paths
    from reidscale.embed import embed_images

    vectors, ok = embed_images(resolve_model_dir(index_dir, manifest, model_dir), images, cameras=cameras)
    if not ok.all():
        bad = [str(images[i])[:80] for i in np.flatnonzero(~ok)[:3]]
        raise ValueError(f"{int((~ok).sum())} image(s) do not decode, e.g. {bad}")
    return vectors, [p if isinstance(p, str) else "" for p in images] if paths is None else paths


def resolve_model_dir(index_dir: str | Path, manifest: dict, model_dir: str | Path | None = None) -> Path:
    """The embedding model of the index at ``index_dir``: ``model_dir`` if given, else the
    manifest's (a path relative to the index directory, so a copied index + model still find
    each other); its weights must be the ones the index was built with."""
    directory = Path(index_dir)
    recorded = manifest.get("model_dir") or ""
    if model_dir:
        path = Path(model_dir)
    elif recorded:
        path = Path(recorded) if Path(recorded).is_absolute() else (directory / recorded)
    else:
        raise FileNotFoundError(f"index {directory}: no model recorded (built from precomputed vectors); "
                                "pass model_dir=")
    if not (path / "config.json").is_file():
        where = f" (recorded as {recorded!r}, relative to the index directory)" if not model_dir else ""
        raise FileNotFoundError(f"index {directory}: embedding model not found at {path}{where}; copy the "
                                "model beside the index as it was, or pass model_dir=")
    sha = exported.model_sha(path)
    if manifest.get("model_sha256") and sha != manifest["model_sha256"]:
        raise ValueError(f"model {path} (weights {str(sha)[:12]}) is not the model this index was built "
                         f"with ({manifest['model_sha256'][:12]}); its embeddings would not be comparable")
    want = manifest.get("model_weights_sha256")
    if want and (not (path / "model.safetensors").is_file() or atomic.sha256_file(path / "model.safetensors") != want):
        raise ValueError(f"model {path}: model.safetensors does not hash to the index's model_weights_sha256 "
                         f"{want[:12]} (changed or corrupt); refusing to embed with it")
    return path.resolve()
