"""Gallery vectors read lazily from disk, a range of rows at a time.

A shard-fill task (``index.build``) reads only its own rows, and a driver that trains or
checks the index reads a sample or a chunk at a time, so no process needs all vectors in
memory. Two sources, each an N×D float32 *array-like* (``shape``, ``len``, ``[lo:hi]``,
``[sorted row positions]``) that the build treats like an ``np.ndarray``:

* ``NpyRows``: an N×D float32 ``.npy``, read with plain file reads (not a memory map, whose
  touched pages would count, and stay, in the reader's resident memory);
* ``ParquetRows``: embedding shards (``embeddings-*.parquet``, as ``embed.embed_split``
  writes them, in file order), only the files overlapping the asked rows are opened.

Both are small frozen dataclasses (paths and row counts), cheap to send to a Ray task.
``normalize`` L2-normalises each row as it is read, with the expression
``index.job._l2_normalise`` uses, so the bytes equal a normalised in-memory copy's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq


def l2_normalise(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm (a row's result does not depend on the other rows read with it)."""
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def _positions(key, n: int) -> tuple[int, int] | np.ndarray:
    """A slice as (lo, hi), or the row positions an index array asks for (bounds checked)."""
    if isinstance(key, slice):
        lo, hi, step = key.indices(n)
        if step != 1:
            raise IndexError("row sources read contiguous ranges or index arrays, not strided slices")
        return lo, max(lo, hi)
    pos = np.asarray(key, dtype=np.int64).reshape(-1)
    if len(pos) and (pos.min() < -n or pos.max() >= n):
        raise IndexError(f"row position out of range for {n} rows")
    return np.where(pos < 0, pos + n, pos)


@dataclass(frozen=True)
class NpyRows:
    """Rows of an N×D float32 (C order) ``.npy`` file; ``offset``: where the data starts."""

    path: str
    n: int
    dim: int
    offset: int
    normalize: bool = False

    @classmethod
    def open(cls, path: str | Path, normalize: bool = False) -> "NpyRows":
        with open(path, "rb") as fh:
            version = np.lib.format.read_magic(fh)
            read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
                np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read_header(fh)
            offset = fh.tell()
        if len(shape) != 2 or dtype != np.float32 or fortran:
            raise ValueError(f"{path}: expected an N×D float32 array in C order, got {shape} {dtype}"
                             f"{' (Fortran order)' if fortran else ''}")
        return cls(str(path), int(shape[0]), int(shape[1]), offset, normalize)

    @property
    def shape(self) -> tuple[int, int]:
        return self.n, self.dim

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, key) -> np.ndarray:
        where = _positions(key, self.n)
        row = 4 * self.dim
        with open(self.path, "rb") as fh:
            if isinstance(where, tuple):
                fh.seek(self.offset + where[0] * row)
                x = np.fromfile(fh, np.float32, (where[1] - where[0]) * self.dim).reshape(-1, self.dim)
            else:  # a sample: one read per row (a sorted sample reads the file forwards)
                x = np.empty((len(where), self.dim), np.float32)
                for j, p in enumerate(where):
                    fh.seek(self.offset + int(p) * row)
                    fh.readinto(memoryview(x[j]).cast("B"))
        return l2_normalise(x) if self.normalize else x


@dataclass(frozen=True)
class ParquetRows:
    """Rows of embedding shards (column ``embedding``, fixed-size lists of float32), files in order."""

    directory: str
    files: tuple[str, ...]
    counts: tuple[int, ...]
    dim: int
    normalize: bool = False

    @classmethod
    def open(cls, directory: str | Path, files: list[str] | None = None, normalize: bool = False) -> "ParquetRows":
        directory = Path(directory)
        names = list(files) if files else sorted(p.name for p in directory.glob("embeddings-*.parquet"))
        if not names:
            raise FileNotFoundError(f"{directory}: no embedding shards")
        counts, dim = [], None
        for name in names:  # the footers only: row counts and the vector width
            f = pq.ParquetFile(directory / name)
            counts.append(f.metadata.num_rows)
            width = f.schema_arrow.field("embedding").type.list_size
            if dim is not None and width != dim:
                raise ValueError(f"{directory / name}: {width}-d embeddings, the files before are {dim}-d")
            dim = width
        return cls(str(directory), tuple(names), tuple(counts), int(dim), normalize)

    @property
    def shape(self) -> tuple[int, int]:
        return int(sum(self.counts)), self.dim

    def __len__(self) -> int:
        return int(sum(self.counts))

    def _file_rows(self, f: int) -> np.ndarray:
        col = pq.read_table(Path(self.directory) / self.files[f], columns=["embedding"]).column(0).combine_chunks()
        return col.values.to_numpy(zero_copy_only=False).reshape(-1, self.dim).astype(np.float32, copy=False)

    def __getitem__(self, key) -> np.ndarray:
        n = len(self)
        where = _positions(key, n)
        starts = np.concatenate([[0], np.cumsum(self.counts)])
        if isinstance(where, tuple):
            lo, hi = where
            parts = [np.zeros((0, self.dim), np.float32)]
            for f in range(len(self.files)):
                a, b = max(lo, starts[f]), min(hi, starts[f + 1])
                if a < b:
                    parts.append(self._file_rows(f)[a - starts[f]: b - starts[f]])
            x = np.concatenate(parts)
        else:
            x = np.empty((len(where), self.dim), np.float32)
            which = np.searchsorted(starts, where, side="right") - 1
            for f in np.unique(which):
                sel = which == f
                x[sel] = self._file_rows(int(f))[where[sel] - starts[f]]
        return l2_normalise(x) if self.normalize else x


@dataclass(frozen=True)
class RowRange:
    """Rows ``lo:hi`` of a source (an array or a row source), indexed from 0; slices only."""

    source: object
    lo: int
    hi: int

    @property
    def shape(self) -> tuple[int, int]:
        return self.hi - self.lo, int(self.source.shape[1])

    def __len__(self) -> int:
        return self.hi - self.lo

    def __getitem__(self, key: slice) -> np.ndarray:
        a, b, _ = key.indices(len(self))
        return np.asarray(self.source[self.lo + a: self.lo + max(a, b)])
