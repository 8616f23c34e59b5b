"""Parquet image shards and their manifest.

Layout of a dataset directory::

    <root>/train-00000.parquet ...   one split per file family
    <root>/query-00000.parquet ...
    <root>/gallery-00000.parquet ...
    <root>/manifest.json             written last, atomically

Rows are clustered by identity: a row group holds whole identities (one identity spans
two row groups only when it alone is larger than a row group), so a reader that takes
row groups gets whole identities. ``row_id`` numbers the rows of a split from 0 in shard
order; it is the int64 id a FAISS gallery stores.
"""

from __future__ import annotations

import json
import logging
import re
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reidscale import atomic

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SPLITS = ("train", "query", "gallery")

SCHEMA = pa.schema(
    [
        pa.field("row_id", pa.int64(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),
        pa.field("identity", pa.int64(), nullable=False),
        # contiguous class index for the train split, -1 elsewhere
        pa.field("label", pa.int64(), nullable=False),
        pa.field("camera", pa.int32(), nullable=False),
        pa.field("split", pa.string(), nullable=False),
        pa.field("path", pa.string(), nullable=False),
        pa.field("width", pa.int32(), nullable=False),
        pa.field("height", pa.int32(), nullable=False),
    ]
)
METADATA_COLUMNS = ["row_id", "identity", "label", "camera", "path"]


class ShardError(ValueError):
    """A shard or manifest is missing, malformed or does not match its checksum."""


# what makes a dataset directory (the job that writes one, for messages that say how)
PREPARE_COMMAND = "python jobs/prepare_data.py"


class _Splits(dict):
    """The manifest's ``splits``: looking up a split the dataset lacks raises a ShardError
    that names the directory, the splits it has and how to make the missing one, not a bare
    ``KeyError: 'query'`` (evaluation, embedding and validation all index it by name)."""

    root: Path = Path(".")
    source: str | None = None

    def __missing__(self, split: str):
        raise ShardError(missing_split_message(self.root, split, sorted(self), self.source))


def missing_split_message(root: str | Path, split: str, have: list[str], source: str | None = None) -> str:
    """One line: which dataset lacks ``split``, what it has, the command that writes it."""
    if split not in SPLITS:
        return f"{root}: {split!r} is not a split name (one of {', '.join(SPLITS)})"
    if source == "folder":
        how = f"{PREPARE_COMMAND} source=folder root=<a folder with train/ query/ gallery/ sub-folders> out_dir={root}"
    elif source and source != "synthetic":
        how = f"{PREPARE_COMMAND} source={source} root=<the {source} folder, with its {split} images> out_dir={root}"
    else:
        how = f"{PREPARE_COMMAND} out_dir={root} (source=synthetic writes train, query and gallery)"
    return f"{root}: the dataset has no {split!r} split (it has: {', '.join(have) or 'none'}); write one with: {how}"


@dataclass
class SplitStats:
    images: int = 0
    # one int64 per identity group written (8 bytes, not a Python int in a set: a million
    # identities stay a few MB); distinct ones are counted at the end
    identity_groups: array = field(default_factory=lambda: array("q"))
    cameras: set = field(default_factory=set)
    shards: list = field(default_factory=list)

    def as_manifest(self) -> dict:
        return {
            "images": self.images,
            "identities": int(len(np.unique(np.frombuffer(self.identity_groups, dtype=np.int64)))),
            "cameras": len(self.cameras),
            "shards": self.shards,
        }


def _group_by_identity(records: Iterable[dict]) -> Iterator[list[dict]]:
    group: list[dict] = []
    for rec in records:
        if group and rec["identity"] != group[-1]["identity"]:
            yield group
            group = []
        group.append(rec)
    if group:
        yield group


class _ShardWriter:
    """Writes one split's shards; rows arrive grouped by identity."""

    def __init__(self, root: Path, split: str, rows_per_group: int, groups_per_shard: int):
        self.root, self.split = root, split
        self.rows_per_group, self.groups_per_shard = rows_per_group, groups_per_shard
        self.stats = SplitStats()
        self._pending: list[dict] = []
        self._writer: pq.ParquetWriter | None = None
        self._groups_in_shard = 0
        self._shard_rows = 0
        self._file: atomic.AtomicFile | None = None

    def add_identity(self, rows: list[dict]) -> None:
        self.stats.identity_groups.append(int(rows[0]["identity"]))
        if self._pending and len(self._pending) + len(rows) > self.rows_per_group:
            self._flush_group()
        self._pending.extend(rows)
        if len(self._pending) >= self.rows_per_group:
            self._flush_group()

    def _flush_group(self) -> None:
        if not self._pending:
            return
        if self._writer is None:
            index = len(self.stats.shards)
            self._file = atomic.AtomicFile(self.root / f"{self.split}-{index:05d}.parquet")
            self._writer = pq.ParquetWriter(self._file.tmp, SCHEMA, compression="zstd")
        first = self.stats.images
        for i, rec in enumerate(self._pending):
            rec["row_id"] = first + i
        self.stats.images += len(self._pending)
        columns = {f.name: [rec[f.name] for rec in self._pending] for f in SCHEMA}
        self.stats.cameras.update(columns["camera"])
        table = pa.Table.from_pydict(columns, schema=SCHEMA)
        # one write_table call per group keeps an identity inside one row group
        self._writer.write_table(table, row_group_size=max(len(self._pending), 1))
        self._shard_rows += len(self._pending)
        self._pending = []
        self._groups_in_shard += 1
        if self._groups_in_shard >= self.groups_per_shard:
            self._close_shard()

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        sha = self._file.commit(checksum=True)
        self.stats.shards.append({"file": self._file.path.name, "rows": self._shard_rows, "sha256": sha})
        self._writer, self._groups_in_shard, self._shard_rows = None, 0, 0

    def close(self) -> SplitStats:
        self._flush_group()
        self._close_shard()
        return self.stats


def write_dataset(
    records: Iterable[dict],
    root: str | Path,
    *,
    source: str,
    rows_per_group: int = 512,
    groups_per_shard: int = 16,
    extra: dict | Callable[[], dict] | None = None,
) -> dict:
    """Write records (grouped by identity) into per-split shards and the manifest.

    Records are dicts with the SCHEMA columns but ``row_id`` (numbered here). ``extra``
    adds top-level manifest keys; a callable is called after the last record, so it can
    report what the record stream learnt on the way (e.g. skipped images).
    Returns the manifest. The manifest is written last: a directory without one is an
    unfinished write and readers refuse it; an exception from ``records`` leaves none.
    """
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "manifest.json").unlink(missing_ok=True)
    # shards of an earlier write here (it may have had more of them) would linger unlisted
    stale = remove_shards(root)
    if stale:
        log.info(f"{root}: removed {len(stale)} shard file(s) of an earlier write before writing anew")
    writers: dict[str, _ShardWriter] = {}
    for group in _group_by_identity(records):
        by_split: dict[str, list[dict]] = {}
        for rec in group:
            if rec["split"] not in SPLITS:
                raise ShardError(f"record {rec.get('path')!r}: split {rec['split']!r} is not one of {SPLITS}")
            by_split.setdefault(rec["split"], []).append(rec)
        for split, rows in by_split.items():
            if split not in writers:
                writers[split] = _ShardWriter(root, split, rows_per_group, groups_per_shard)
            writers[split].add_identity(rows)
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "source": source,
        "splits": {split: w.close().as_manifest() for split, w in writers.items()},
        **((extra() if callable(extra) else extra) or {}),
    }
    train = manifest["splits"].get("train")
    if train:
        manifest["num_classes"] = train["identities"]
    atomic.write_json(root / "manifest.json", manifest)
    return manifest


def remove_shards(root: str | Path) -> list[Path]:
    """Delete this module's shard files (and unfinished temporaries) under ``root``; return them.

    For a write that failed: without a manifest the directory is unusable anyway. Only
    names the writer makes (``<split>-NNNNN.parquet`` and their ``.tmp``) are touched.
    """
    root = Path(root)
    names = re.compile(rf"^\.?({'|'.join(SPLITS)})-\d{{5}}\.parquet(\.tmp(-\d+)?)?$")
    removed = [p for p in root.iterdir() if names.match(p.name)] if root.is_dir() else []
    for path in removed:
        path.unlink(missing_ok=True)
    return removed


def read_manifest(root: str | Path) -> dict:
    path = Path(root) / "manifest.json"
    if not path.is_file():
        raise ShardError(f"{path} does not exist: the dataset was never written or its write did not finish "
                         f"(write it with: {PREPARE_COMMAND} out_dir={Path(root)})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ShardError(f"{path} is not valid JSON: {exc}") from None
    if manifest.get("schema_version") != SCHEMA_VERSION:
        raise ShardError(f"{path}: schema_version {manifest.get('schema_version')!r}, expected {SCHEMA_VERSION}")
    if not isinstance(manifest.get("splits"), dict):
        raise ShardError(f"{path}: no 'splits' mapping")
    manifest["splits"] = _Splits(manifest["splits"])
    manifest["splits"].root, manifest["splits"].source = Path(root), manifest.get("source")
    return manifest


def split_info(root: str | Path, split: str, manifest: dict | None = None) -> dict:
    """The manifest entry of one split (images, identities, cameras, shards); a ShardError
    naming the directory, its splits and the command that writes the missing one if absent."""
    manifest = manifest or read_manifest(root)
    if split not in manifest["splits"]:
        raise ShardError(missing_split_message(root, split, sorted(manifest["splits"]), manifest.get("source")))
    return manifest["splits"][split]


def split_files(root: str | Path, split: str, manifest: dict | None = None) -> list[Path]:
    root = Path(root)
    return [root / s["file"] for s in split_info(root, split, manifest)["shards"]]


# (directory, file name) pairs already warned about: one warning per file per process, not one per read
_warned_unlisted: set[tuple[str, str]] = set()


def unlisted_parquet_files(root: str | Path, manifest: dict | None = None) -> list[Path]:
    """``*.parquet`` files in ``root`` that the manifest lists for no split (sorted).

    Readers go by the manifest only, so such a file (a leftover of an earlier, larger
    prepare into the same directory, or data copied in by hand) is never read. It is
    probably not what the user meant: each one is logged once as a warning, naming it.
    """
    root = Path(root)
    manifest = manifest or read_manifest(root)
    listed = {s["file"] for info in manifest["splits"].values() for s in info.get("shards", [])}
    extra = sorted(p for p in root.glob("*.parquet") if p.name not in listed)
    for path in extra:
        key = (str(root.resolve()), path.name)
        if key not in _warned_unlisted:
            _warned_unlisted.add(key)
            log.warning(f"{path}: not listed in {root / 'manifest.json'}, so it is ignored (delete it, or re-run "
                        f"{PREPARE_COMMAND} with out_dir={root} to rewrite the dataset)")
    return extra


def verify_split(root: str | Path, split: str, *, checksums: bool = True) -> list[Path]:
    """Check every shard of ``split`` against schema and manifest; return the file list.

    Raises ShardError naming the first bad file. Run before any training starts.
    """
    root = Path(root)
    manifest = read_manifest(root)
    entries = split_info(root, split, manifest)["shards"]
    unlisted_parquet_files(root, manifest)
    files = []
    for entry in entries:
        path = root / entry["file"]
        if not path.is_file():
            raise ShardError(f"{path}: listed in the manifest but missing")
        try:
            schema = pq.read_schema(path)
            rows = pq.ParquetFile(path).metadata.num_rows
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise ShardError(f"{path}: not a readable Parquet file ({exc})") from None
        missing = [f.name for f in SCHEMA if f.name not in schema.names]
        if missing:
            raise ShardError(f"{path}: schema lacks column(s) {missing}")
        for f in SCHEMA:
            if not schema.field(f.name).type.equals(f.type):
                raise ShardError(f"{path}: column {f.name} has type {schema.field(f.name).type}, expected {f.type}")
        if rows != entry["rows"]:
            raise ShardError(f"{path}: {rows} rows, manifest says {entry['rows']}")
        if checksums and atomic.sha256_file(path) != entry["sha256"]:
            raise ShardError(f"{path}: sha256 does not match the manifest (file changed or corrupt)")
        files.append(path)
    if not files:
        raise ShardError(f"{root}: the manifest lists no shards for split {split!r}")
    return files


def read_metadata(root: str | Path, split: str) -> pa.Table:
    """Every column but the image bytes, for a whole split (small: tens of bytes a row)."""
    manifest = read_manifest(root)
    files = split_files(root, split, manifest)
    unlisted_parquet_files(root, manifest)
    return pa.concat_tables([pq.read_table(f, columns=METADATA_COLUMNS) for f in files])
