"""Crops out of the shards as image files: queries for ``jobs/search.py images=...``.

    python jobs/export_images.py split=query limit=10
    python jobs/export_images.py data_dir=/data/market split=gallery 'identities=[12,40]' limit=0 out_dir=/tmp/crops

A file holds the bytes stored in the shard (the source file's own bytes: never
re-encoded), named ``<row_id>_id<identity>_c<camera><suffix>`` so the truth travels with
it. The split is checked against its manifest (sha256) first. ``exported.json`` beside the
files lists path, identity, camera and row_id of each, written last.
"""

from __future__ import annotations

import io
import logging
import shlex
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Iterator, Literal

import pyarrow.parquet as pq
from PIL import Image

from reidscale import atomic
from reidscale.config import ConfigError
from reidscale.data import shards
from reidscale.data.sources.image_files import IMAGE_SUFFIXES

log = logging.getLogger(__name__)

_SUFFIX_OF_FORMAT = {"JPEG": ".jpg", "PNG": ".png", "BMP": ".bmp", "WEBP": ".webp", "GIF": ".gif", "TIFF": ".tif"}


@dataclass
class ExportJobConfig:
    run_dir: str = "runs/demo"
    # a prepared dataset (manifest.json + shards); empty: <run_dir>/data
    data_dir: str = ""
    split: Literal["train", "query", "gallery"] = "query"
    # rows to write, in shard order (identity after identity); 0: every row that passes `identities`
    limit: int = 10
    # only these identities (`identities=[12,40]`); empty: any
    identities: list[int] = field(default_factory=list)
    # empty: <run_dir>/exported/<split>
    out_dir: str = ""
    # the index the printed jobs/search.py command searches; empty: <run_dir>/index/trained
    index_dir: str = ""

    def validate(self) -> None:
        if self.limit < 0:
            raise ConfigError("limit: must be >= 0 (0: no limit)")


def _suffix(data: bytes, stored_path: str) -> str:
    """The stored path's image suffix, else the one of the format the bytes are in."""
    suffix = Path(stored_path).suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return suffix
    try:
        return _SUFFIX_OF_FORMAT.get(Image.open(io.BytesIO(data)).format, ".img")
    except Exception:  # prepare only stores images that decode; a stray row keeps its bytes anyway
        return ".img"


_COLUMNS = ["image", "row_id", "identity", "camera", "path"]


def _rows(files: list[Path], identities: set[int]) -> Iterator[dict]:
    """The split's rows in shard order (a few hundred in memory at a time), optionally only some identities."""
    for path in files:
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256, columns=_COLUMNS):
            columns = batch.to_pydict()
            for values in zip(*(columns[c] for c in _COLUMNS)):
                row = dict(zip(_COLUMNS, values))
                if not identities or row["identity"] in identities:
                    yield row


def export_images(cfg: ExportJobConfig) -> dict:
    """Write the selected rows' images under ``out_dir``; return {out_dir, split, images: [...]}.

    Each entry of ``images``: file (absolute path), identity, camera, row_id, stored path.
    """
    data_dir = Path(cfg.data_dir or Path(cfg.run_dir) / "data")
    out_dir = Path(cfg.out_dir or Path(cfg.run_dir) / "exported" / cfg.split)
    files = shards.verify_split(data_dir, cfg.split)
    wanted = set(cfg.identities)
    out_dir.mkdir(parents=True, exist_ok=True)
    images: list[dict] = []
    for row in islice(_rows(files, wanted), cfg.limit or None):
        target = out_dir / f"{row['row_id']:07d}_id{row['identity']}_c{row['camera']}{_suffix(row['image'], row['path'])}"
        atomic.write_bytes(target, row["image"])
        images.append({"file": str(target.resolve()), **{k: row[k] for k in ("identity", "camera", "row_id", "path")}})
    if not images:
        have = "" if not wanted else f" with identities {sorted(wanted)}"
        raise ValueError(f"{data_dir}: no {cfg.split} rows{have} to export")
    summary = {"data_dir": str(data_dir), "split": cfg.split, "out_dir": str(out_dir), "images": images}
    atomic.write_json(out_dir / "exported.json", summary)
    log.info(f"wrote {len(images)} {cfg.split} images to {out_dir}")
    return summary


def search_command(summary: dict, index_dir: str) -> str:
    """The jobs/search.py command line that queries the gallery with the exported files."""
    files = ",".join(e["file"] for e in summary["images"])
    cameras = ",".join(str(e["camera"]) for e in summary["images"])
    # cameras only matter to an SIE model, and only when every one is known (>= 0)
    with_cameras = all(e["camera"] >= 0 for e in summary["images"])
    # `cameras=[0,3]` (a YAML list, quoted for the shell): the plain `cameras=0,3` form is read as
    # strings by config.py today and refused for a list[int] key
    return (f"python jobs/search.py index_dir={shlex.quote(index_dir)} images={shlex.quote(files)}"
            + (f" 'cameras=[{cameras}]'" if with_cameras else ""))


def format_listing(summary: dict, index_dir: str) -> str:
    """A table a person reads (file, identity, camera, row_id), then the search command."""
    lines = [f"{'identity':>9} {'camera':>6} {'row_id':>8}  file"]
    lines += [f"{e['identity']:>9} {e['camera']:>6} {e['row_id']:>8}  {e['file']}" for e in summary["images"]]
    lines.append(f"{len(summary['images'])} {summary['split']} images in {summary['out_dir']} "
                 f"(listed in exported.json); search the gallery with them:")
    lines.append(f"  {search_command(summary, index_dir)}")
    return "\n".join(lines)


def run_export(cfg: ExportJobConfig) -> None:
    """The job: export, print the listing and the search command (the JSON is in exported.json)."""
    summary = export_images(cfg)
    index_dir = cfg.index_dir or str(Path(cfg.run_dir) / "index" / "trained")
    if not Path(index_dir).is_dir():
        index_dir = "<an index built by jobs/build_index.py>"
    print(format_listing(summary, index_dir), flush=True)
