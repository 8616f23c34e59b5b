"""The index directory on disk: atomic file writes, the manifest, checksums, the writer lock.

Protocol (what makes an index directory safe to read while it changes):

* every file is written with ``reidscale.atomic`` (temporary name, fsync, rename, fsync of
  the directory); a
  data file (shard, metadata, tombstones) is never rewritten under the same name once a
  manifest lists it (``add``/``remove`` write new files with the new generation number);
* ``manifest.json`` is written last, atomically, and is the only thing a reader trusts:
  it lists every file with its sha256. A reader that loaded generation g keeps a
  consistent view of g even while a writer publishes g+1;
* writers (``Gallery.add``/``remove``) hold an exclusive ``flock`` on ``.writer.lock``
  for read-modify-write of the manifest, so two writers never lose each other's changes.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
from pathlib import Path
from typing import Iterator

from reidscale import atomic

INDEX_FORMAT = "reidscale-index-v2"
# v1 (no generations, add/remove) is read as generation 0
READABLE_FORMATS = ("reidscale-index-v1", INDEX_FORMAT)
MANIFEST = "manifest.json"
# what a "no index here" error tells the user to run (re-running it also finishes an interrupted build)
BUILT_BY = "build it with python jobs/build_index.py model_dir=... out_dir=..."


class GalleryError(ValueError):
    """An index directory is incomplete, tampered with, or of another format."""


def write_index(index, path: str | Path) -> str:
    import faiss

    return atomic.write_file(path, lambda tmp: faiss.write_index(index, str(tmp)), checksum=True)


def write_table(table, path: str | Path) -> str:
    import pyarrow.parquet as pq

    return atomic.write_file(path, lambda tmp: pq.write_table(table, tmp), checksum=True)


def read_manifest(directory: str | Path) -> dict:
    """The published manifest of an index directory, or a GalleryError saying why not."""
    path = Path(directory) / MANIFEST
    if not Path(directory).is_dir():
        raise GalleryError(f"{Path(directory)}: no index directory; {BUILT_BY}")
    if not path.is_file():
        raise GalleryError(f"{Path(directory)}: no {MANIFEST}; the index was never completed; {BUILT_BY}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise GalleryError(f"{path}: not valid JSON ({exc})") from None
    if manifest.get("format") not in READABLE_FORMATS:
        raise GalleryError(f"{path}: format {manifest.get('format')!r}, expected one of {READABLE_FORMATS}")
    return manifest


def verified(directory: str | Path, entry: dict, *, verify: bool = True) -> Path:
    """Path of a file listed in the manifest, after checking it exists and matches its sha256."""
    path = Path(directory) / entry["file"]
    if not path.is_file():
        raise GalleryError(f"{path}: listed in the manifest but missing (partial copy or deleted)")
    if verify and atomic.sha256_file(path) != entry["sha256"]:
        raise GalleryError(f"{path}: sha256 does not match the manifest; refusing to load it")
    return path


@contextlib.contextmanager
def writer_lock(directory: str | Path) -> Iterator[None]:
    """Exclusive lock for writers of one index directory (readers never take it)."""
    with open(Path(directory) / ".writer.lock", "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)
