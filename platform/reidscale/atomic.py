"""Atomic file and directory writes: the one place that decides how a file reaches disk.

Contract: a reader that opens ``path`` sees either the previous content or the new one,
never a half-written file, and a failed write leaves the previous content and no
temporary behind. The rule, for every writer in the project:

1. write under a temporary name in the same directory (``.<name>.tmp-<pid>``: same
   filesystem, so the rename is atomic; hidden, so globs for ``*.parquet`` skip it);
2. fsync the file (its bytes are on disk before its name is);
3. ``os.replace`` it over ``path``;
4. fsync the directory (the rename itself survives a crash).

``AtomicFile`` is the primitive (for writers that stream over many calls, e.g. a
ParquetWriter); ``write_file`` / ``write_bytes`` / ``write_json`` / ``replace_dir`` are
the short forms.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Callable


def temp_name(path: str | Path) -> Path:
    """The temporary name a write of ``path`` uses (one per process, beside ``path``)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def fsync_path(path: str | Path) -> None:
    """fsync a file or a directory by name."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


class AtomicFile:
    """A write of ``path`` in progress: write to ``.tmp``, then ``commit()`` or ``abort()``.

    Usable as a context manager: commits on a normal exit, aborts (removes the temporary)
    on an exception.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.tmp = temp_name(self.path)

    def commit(self, checksum: bool = False) -> str | None:
        """fsync the temporary, rename it over ``path``, fsync the directory; its sha256 if asked."""
        try:
            fsync_path(self.tmp)
            # hashed before the rename: the digest is of exactly the bytes published
            digest = sha256_file(self.tmp) if checksum else None
            os.replace(self.tmp, self.path)
        except BaseException:
            self.abort()
            raise
        fsync_path(self.path.parent)
        return digest

    def abort(self) -> None:
        self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "AtomicFile":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.commit()
        else:
            self.abort()


def write_file(path: str | Path, write: Callable[[Path], None], checksum: bool = False) -> str | None:
    """``write(tmp_path)`` then publish it as ``path``; the file's sha256 if ``checksum``."""
    pending = AtomicFile(path)
    try:
        write(pending.tmp)
    except BaseException:
        pending.abort()
        raise
    return pending.commit(checksum=checksum)


def write_bytes(path: str | Path, data: bytes) -> None:
    write_file(path, lambda tmp: tmp.write_bytes(data))


def write_json(path: str | Path, obj: dict) -> None:
    """``obj`` as indented, key-sorted JSON with a trailing newline."""
    write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode())


def replace_dir(path: str | Path, build: Callable[[Path], None]) -> Path:
    """``build(tmp_dir)`` fills a fresh directory, which then replaces ``path`` (existing or not).

    Every file in it is fsynced before the swap. An existing ``path`` is moved aside and
    renamed over in two steps (POSIX cannot rename a directory over a non-empty one), so a
    reader can find ``path`` missing for that instant, never half-written.
    """
    path = Path(path)
    tmp = temp_name(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        build(tmp)
        for child in tmp.rglob("*"):
            fsync_path(child)
        fsync_path(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if path.exists():
        old = path.with_name(f".{path.name}.old-{os.getpid()}")
        os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, path)
    fsync_path(path.parent)
    return path
