"""``Gallery``: open a built index, search every shard, merge, map ids to identities."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from reidscale.data.shards import sha256_file
from reidscale.index.build import INDEX_FORMAT


class GalleryError(ValueError):
    """An index directory is incomplete, tampered with, or of another format."""


def merge_topk(scores: list[np.ndarray], ids: list[np.ndarray], k: int, larger_is_better: bool) -> tuple[np.ndarray, np.ndarray]:
    """Merge per-shard (Q×k_s) results into global top-k; FAISS pads missing hits with id -1."""
    all_scores = np.concatenate(scores, axis=1)
    all_ids = np.concatenate(ids, axis=1)
    missing = all_ids < 0
    key = -all_scores if larger_is_better else all_scores.copy()
    key = np.where(missing, np.inf, key)
    order = np.argsort(key, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(all_scores, order, 1), np.take_along_axis(all_ids, order, 1)


class Gallery:
    def __init__(self, directory: str | Path, *, verify: bool = True, threads: int = 0):
        import faiss

        self.directory = Path(directory)
        manifest_path = self.directory / "manifest.json"
        if not manifest_path.is_file():
            raise GalleryError(f"{self.directory}: no manifest.json; the index was never completed")
        self.manifest = json.loads(manifest_path.read_text())
        if self.manifest.get("format") != INDEX_FORMAT:
            raise GalleryError(f"{manifest_path}: format {self.manifest.get('format')!r}, expected {INDEX_FORMAT!r}")
        self.metric = self.manifest["metric"]
        self.dim = self.manifest["dim"]
        self.shards = []
        for entry in self.manifest["shards"]:
            path = self.directory / entry["file"]
            if not path.is_file():
                raise GalleryError(f"{path}: listed in the manifest but missing")
            if verify and sha256_file(path) != entry["sha256"]:
                raise GalleryError(f"{path}: sha256 does not match the manifest; refusing to load it")
            index = faiss.read_index(str(path))
            if index.ntotal != entry["ntotal"]:
                raise GalleryError(f"{path}: ntotal {index.ntotal}, manifest says {entry['ntotal']}")
            self.shards.append(index)
        meta = self.manifest["metadata"]
        meta_path = self.directory / meta["file"]
        if verify and sha256_file(meta_path) != meta["sha256"]:
            raise GalleryError(f"{meta_path}: sha256 does not match the manifest")
        table = pq.read_table(meta_path)
        row_ids = table.column("row_id").to_numpy()
        order = np.argsort(row_ids)
        self._row_ids = row_ids[order]
        self._identity = table.column("identity").to_numpy()[order]
        self._camera = table.column("camera").to_numpy()[order]
        self._pool = ThreadPoolExecutor(max_workers=max(1, threads or min(len(self.shards), 4)))

    @property
    def ntotal(self) -> int:
        return sum(s.ntotal for s in self.shards)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(scores Q×k, row ids Q×k); scores are inner products (ip) or squared L2 (l2)."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise ValueError(f"queries must be Q×{self.dim}, got {queries.shape}")
        results = list(self._pool.map(lambda index: index.search(queries, k), self.shards))
        return merge_topk([r[0] for r in results], [r[1] for r in results], k, self.metric == "ip")

    def identities(self, row_ids: np.ndarray) -> np.ndarray:
        """Identity for each row id (-1 where the id is -1, i.e. no hit)."""
        pos = np.searchsorted(self._row_ids, row_ids)
        pos = np.clip(pos, 0, len(self._row_ids) - 1)
        found = self._row_ids[pos] == row_ids
        return np.where(found & (row_ids >= 0), self._identity[pos], -1)

    def cameras(self, row_ids: np.ndarray) -> np.ndarray:
        pos = np.clip(np.searchsorted(self._row_ids, row_ids), 0, len(self._row_ids) - 1)
        return np.where(row_ids >= 0, self._camera[pos], -1)
