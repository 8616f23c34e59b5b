"""The gallery deployment: one ``Gallery`` per replica, searched and written under a read/write lock.

``Gallery`` already gives each search one manifest generation, but a request here makes
several calls (search, then identities/cameras/paths of the hits); the lock keeps a
write or a refresh from swapping the generation between them, so every response is
from exactly the generation it reports. Writes go through ``Gallery.add``/``remove``,
which publish a new generation on disk (fsynced) before they return: a write this
deployment acknowledges survives a restart.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from contextlib import contextmanager

import numpy as np

from reidscale.index.distributed import DistributedGallery
from reidscale.index.gallery import Gallery
from reidscale.index.metric import larger_is_closer

log = logging.getLogger(__name__)


class ReadWriteLock:
    """Many readers or one writer; a waiting writer blocks new readers so writes are not starved."""

    def __init__(self):
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._writers_waiting = 0

    @contextmanager
    def read(self):
        with self._cond:
            while self._writer or self._writers_waiting:
                self._cond.wait()
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextmanager
    def write(self):
        with self._cond:
            self._writers_waiting += 1
            while self._writer or self._readers:
                self._cond.wait()
            self._writers_waiting -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


def search_filtered(gallery: Gallery, queries: np.ndarray, k: int, cameras: list[int] | None = None,
                    exclude_camera: int | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-k distinct identities among gallery rows that pass the camera filter.

    (identities, best score, best row id), each Q×k, padded with identity -1 like
    ``Gallery.search_identities`` (which this is when there is no filter). The search
    deepens until each query has k identities left after filtering or the whole gallery
    was fetched, so a filter never silently returns fewer identities than exist.
    """
    if cameras is None and exclude_camera is None:
        return gallery.search_identities(queries, k)
    larger = larger_is_closer(gallery.metric)
    q = len(queries)
    out_ident = np.full((q, k), -1, np.int64)
    out_score = np.full((q, k), -np.inf if larger else np.inf, np.float32)
    out_row = np.full((q, k), -1, np.int64)
    total = max(gallery.ntotal, 1)
    allowed = None if cameras is None else np.asarray(cameras, dtype=np.int64)
    todo, fetch = np.arange(q), min(8 * k, total)
    while len(todo):
        scores, rows = gallery.search(queries[todo], fetch)
        idents, cams = gallery.identities(rows), gallery.cameras(rows)
        keep = rows >= 0
        if allowed is not None:
            keep &= np.isin(cams, allowed)
        if exclude_camera is not None:
            keep &= cams != exclude_camera
        again = []
        for j, qi in enumerate(todo):
            ident, score, row = idents[j][keep[j]], scores[j][keep[j]], rows[j][keep[j]]
            _, first = np.unique(ident, return_index=True)
            first = np.sort(first)[:k]
            out_ident[qi, : len(first)] = ident[first]
            out_score[qi, : len(first)] = score[first]
            out_row[qi, : len(first)] = row[first]
            if len(first) < k and fetch < total and rows[j, -1] >= 0:
                again.append(qi)
        todo, fetch = np.asarray(again, dtype=np.int64), min(4 * fetch, total)
    return out_ident, out_score, out_row


def all_row_ids(gallery: Gallery) -> np.ndarray:
    """Every row id this gallery ever assigned (removed ones included)."""
    manifest = gallery.manifest
    if "next_row_id" in manifest:
        return np.arange(int(manifest["next_row_id"]), dtype=np.int64)
    top = max((e["id_max"] for e in manifest["shards"] if e.get("id_max") is not None), default=-1)
    return np.arange(int(top) + 1, dtype=np.int64)


class GalleryService:
    """The gallery deployment's logic, testable without Ray: search, enrol, remove, info."""

    def __init__(self, index_dir: str, *, search_params: dict | None = None, verify: bool = True,
                 refresh_s: float = 1.0, distributed: dict | None = None, mmap: bool = False):
        """``distributed``: ``DistributedGallery`` options (num_actors, actor_cpus): the vectors live in
        shard actors over the cluster's nodes, this replica holds the metadata; None: one ``Gallery`` here.
        ``mmap``: shards mapped from disk, not read into memory (either way)."""
        if distributed is None:
            self.gallery = Gallery(index_dir, verify=verify, search_params=search_params, mmap=mmap)
        else:
            self.gallery = DistributedGallery(index_dir, verify=verify, search_params=search_params, mmap=mmap,
                                              **distributed)
        self.lock = ReadWriteLock()
        self.refresh_s = refresh_s
        self._checked = time.monotonic()
        self._max_identity: tuple[int, int] | None = None  # (generation, largest identity ever used)
        log.info("gallery %s: generation %d, %d vectors", index_dir, self.gallery.generation, self.gallery.ntotal)

    def _maybe_refresh(self) -> None:
        """Pick up generations other writers (other replicas, jobs) published, at most every refresh_s."""
        if time.monotonic() - self._checked < self.refresh_s:
            return
        with self.lock.write():
            self._checked = time.monotonic()
            if self.gallery.refresh():
                log.info("gallery: now at generation %d", self.gallery.generation)

    def info(self) -> dict:
        with self.lock.read():
            m = self.gallery.manifest
            identity, _ = self.gallery.live_labels()
            return {"generation": self.gallery.generation, "vectors": int(self.gallery.ntotal),
                    "identities": int(np.unique(identity).size),
                    "dim": self.gallery.dim, "metric": self.gallery.metric, "factory": m.get("factory"),
                    "shards": len(m["shards"]), "model_sha256": m.get("model_sha256", ""),
                    "shard_actors": len(self.gallery.actors) if isinstance(self.gallery, DistributedGallery) else 0,
                    "gallery_pid": os.getpid()}

    def search(self, queries: np.ndarray, k: int, cameras=None, exclude_camera=None) -> dict:
        self._maybe_refresh()
        with self.lock.read():
            ident, score, row = search_filtered(self.gallery, queries, k, cameras, exclude_camera)
            return {"generation": self.gallery.generation, "identity": ident, "score": score, "row_id": row,
                    "camera": self.gallery.cameras(row), "path": self.gallery.paths(row)}

    def _largest_identity(self) -> int:
        gen = self.gallery.generation
        if self._max_identity is None or self._max_identity[0] != gen:
            idents = self.gallery.identities(all_row_ids(self.gallery))
            self._max_identity = (gen, int(idents.max()) if len(idents) else -1)
        return self._max_identity[1]

    def enrol(self, vectors: np.ndarray, identity: int | None, cameras=None, paths=None) -> dict:
        """Add ``vectors`` under ``identity`` (None: one never used in this gallery); durable on return."""
        with self.lock.write():
            self.gallery.refresh()  # assign "new" identities against the latest generation
            if identity is None:
                identity = self._largest_identity() + 1
            before = self._largest_identity()
            rows = self.gallery.add(vectors, identities=np.full(len(vectors), identity, np.int64),
                                    cameras=cameras, paths=paths)
            self._max_identity = (self.gallery.generation, max(before, int(identity)))
            return {"identity": int(identity), "row_ids": rows.tolist(), "generation": self.gallery.generation}

    def remove_rows(self, row_ids: list[int]) -> dict:
        with self.lock.write():
            removed = self.gallery.remove(np.asarray(row_ids, dtype=np.int64))
            return {"removed": int(removed), "generation": self.gallery.generation}

    def remove_identity(self, identity: int) -> dict:
        with self.lock.write():
            self.gallery.refresh()
            rows = all_row_ids(self.gallery)
            rows = rows[self.gallery.identities(rows) == identity]
            removed = self.gallery.remove(rows) if len(rows) else 0
            return {"removed": int(removed), "generation": self.gallery.generation}


def gallery_deployment():
    """The Ray Serve deployment class (built here so importing this module needs no Ray)."""
    from ray import serve

    @serve.deployment(name="gallery", max_ongoing_requests=64)
    class GalleryDeployment:
        def __init__(self, index_dir: str, options: dict):
            """``options``: ``GalleryServeConfig.service_options()``."""
            logging.basicConfig(level=logging.INFO)
            self.service = GalleryService(index_dir, **options)

        # FAISS releases the GIL: searches in threads run in parallel; the event loop stays free
        async def info(self) -> dict:
            return await asyncio.to_thread(self.service.info)

        async def search(self, queries, k, cameras=None, exclude_camera=None) -> dict:
            return await asyncio.to_thread(self.service.search, queries, k, cameras, exclude_camera)

        async def enrol(self, vectors, identity, cameras=None, paths=None) -> dict:
            return await asyncio.to_thread(self.service.enrol, vectors, identity, cameras, paths)

        async def remove_rows(self, row_ids) -> dict:
            return await asyncio.to_thread(self.service.remove_rows, row_ids)

        async def remove_identity(self, identity) -> dict:
            return await asyncio.to_thread(self.service.remove_identity, identity)

    return GalleryDeployment
