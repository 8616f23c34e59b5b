"""Turn a source (a public dataset layout, a folder of identities, or the synthetic
generator) into Parquet shards + manifest.json.

    source=market1501 root=/data/Market-1501-v15.09.15
    source=msmt17 root=/data/MSMT17_V1 msmt17_include_val=true
    source=folder root=/data/crops folder.cameras_csv=/data/crops/cameras.csv
    source=synthetic synthetic.num_identities=1000000 synthetic.images=placeholder

Images are stored as the bytes of their files. A file that is not a usable image (or
whose name does not parse) is skipped and counted; the job stops, naming the rate and
example files, once more than ``max_error_rate`` of the listed files are skipped, and
then leaves no shards behind. The counts go to the log and to the manifest (``skipped``).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Literal

from reidscale.config import ConfigError
from reidscale.data.shards import SPLITS, remove_shards, write_dataset
from reidscale.data.sources.image_files import Listing, SkipLog, ordered_map, file_records
from reidscale.data.sources.image_folder import image_folder
from reidscale.data.sources.market1501 import dukemtmc, market1501
from reidscale.data.sources.msmt17 import msmt17
from reidscale.data.sources.synthetic import SyntheticConfig, generate, planned_images
from reidscale.data.sources.veri776 import veri776
from reidscale.data.stored_size import stored_at
from reidscale.data.transforms import MAX_IMAGE_PIXELS
from reidscale.progress import progress_bar

log = logging.getLogger(__name__)

Source = Literal["synthetic", "market1501", "dukemtmc", "msmt17", "veri776", "folder"]


@dataclass
class FolderConfig:
    """``source=folder``: ``<root>/<identity>/<image>`` (see reidscale.data.sources.image_folder)."""

    # the split of every image when root has no train/query/gallery sub-folders
    split: Literal["train", "query", "gallery"] = "train"
    # optional CSV of "path,camera" lines, paths relative to root; unnamed images get camera -1
    cameras_csv: str = ""


@dataclass
class PrepareJobConfig:
    source: Source = "synthetic"
    # the dataset folder (every source but synthetic)
    root: str = ""
    # empty: <run_dir>/data
    out_dir: str = ""
    run_dir: str = "runs/demo"
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)
    folder: FolderConfig = field(default_factory=FolderConfig)
    # MSMT17: add list_val.txt's images to train (the usual protocol leaves them out)
    msmt17_include_val: bool = False
    # the job fails once more than this fraction of the listed images is skipped
    max_error_rate: float = 0.001
    # images declaring more pixels are refused unread (decompression bombs)
    max_image_pixels: int = MAX_IMAGE_PIXELS
    # threads reading and checking files (file reads and JPEG decoding release the GIL)
    read_threads: int = 2
    rows_per_group: int = 512
    groups_per_shard: int = 16
    # > 0: store every crop re-encoded at this size (the training transform's height/width),
    # so no epoch decodes a larger crop or resizes it (data/stored_size.py); 0: the files' bytes
    store_height: int = 0
    store_width: int = 0
    store_quality: int = 95

    def validate(self) -> None:
        if self.rows_per_group < 1 or self.groups_per_shard < 1:
            raise ConfigError("rows_per_group/groups_per_shard: must be >= 1")
        if (self.store_height > 0) != (self.store_width > 0) or min(self.store_height, self.store_width) < 0:
            raise ConfigError("store_height/store_width: give both (the training size, e.g. 256 and 128) or neither")
        if self.store_height and min(self.store_height, self.store_width) < 16:
            raise ConfigError("store_height/store_width: at least 16 pixels")
        if not 1 <= self.store_quality <= 100:
            raise ConfigError("store_quality: a JPEG quality in [1, 100]")
        if self.source != "synthetic" and not self.root:
            raise ConfigError(f"root: source={self.source} reads a dataset folder; give root=/path/to/it")
        if self.root and self.source != "synthetic" and not Path(self.root).expanduser().is_dir():
            raise ConfigError(f"root: {self.root} is not a directory")
        if self.folder.cameras_csv and not Path(self.folder.cameras_csv).expanduser().is_file():
            raise ConfigError(f"folder.cameras_csv: {self.folder.cameras_csv} is not a file")
        if not 0.0 <= self.max_error_rate <= 1.0:
            raise ConfigError("max_error_rate: must be a fraction in [0, 1]")
        if not 1 <= self.max_image_pixels <= MAX_IMAGE_PIXELS:
            # training's decoder refuses more (transforms.MAX_IMAGE_PIXELS): admitting them here
            # would only move the failure to training time
            raise ConfigError(f"max_image_pixels: must be in [1, {MAX_IMAGE_PIXELS}]")
        if self.read_threads < 1:
            raise ConfigError("read_threads: must be >= 1")


# name -> reader of (dataset folder, listing); a dict is enough (no registry)
READERS: dict[str, Callable[[PrepareJobConfig], tuple[Path, Listing]]] = {
    "market1501": lambda cfg: market1501(cfg.root),
    "dukemtmc": lambda cfg: dukemtmc(cfg.root),
    "msmt17": lambda cfg: msmt17(cfg.root, include_val=cfg.msmt17_include_val),
    "veri776": lambda cfg: veri776(cfg.root),
    "folder": lambda cfg: image_folder(cfg.root, cfg.folder.split, cfg.folder.cameras_csv),
}


def _progress(records: Iterable[dict], total: int, desc: str, *, planned=None,
              skipped: Callable[[], int] | None = None) -> Iterator[dict]:
    """``records`` with a progress bar counting images (written or skipped) against ``total``.

    ``planned`` (images per identity, index identity - 1) is a lower bound per identity: an
    identity that yields more raises the total as it happens, so the count never runs past
    it and the total is exact at the end. ``skipped()`` is the running count of images the
    stream dropped (they are done too). Log records emitted meanwhile (Ray's, ours) are
    written above the bar on their own lines, not glued to it.
    """
    skipped = skipped or (lambda: 0)
    base = skipped()
    with progress_bar(total, desc, "img") as bar:
        identity, seen, written = None, 0, 0
        for rec in records:
            if planned is not None:
                seen = seen + 1 if rec["identity"] == identity else 1
                identity = rec["identity"]
                if seen > planned[identity - 1]:
                    bar.total += 1
            written += 1
            bar.update(written + skipped() - base - bar.n)
            yield rec
        bar.update(written + skipped() - base - bar.n)


def _listed_records(cfg: PrepareJobConfig):
    """(records, manifest extra) of a folder source: listing, checks and the skip tally."""
    base, listing = READERS[cfg.source](cfg)
    total = len(listing.entries) + len(listing.skipped)
    if not total:
        raise FileNotFoundError(f"{cfg.source}: no images found under {base}")
    counts = {s: sum(e.split == s for e in listing.entries) for s in SPLITS}
    log.info(f"{cfg.source}: {base}: {total} images listed ({', '.join(f'{s} {n}' for s, n in counts.items())}), "
             f"{listing.junk} junk dropped")
    skips = SkipLog(total, cfg.max_error_rate)
    for skip in listing.skipped:
        skips.add(skip)
    records = file_records(listing.entries, base, skips, max_pixels=cfg.max_image_pixels, workers=cfg.read_threads,
                           store=_store(cfg))
    records = _progress(records, len(listing.entries), f"{cfg.source} images", skipped=lambda: skips.count)

    def extra() -> dict:
        return {"root": str(base), "junk_dropped": listing.junk, "skipped": skips.summary(),
                **({"notes": listing.notes} if listing.notes else {}), **_stored_size(cfg)}

    return records, extra


def _store(cfg: PrepareJobConfig) -> Callable[[bytes], bytes] | None:
    """bytes → the bytes to store: a crop re-encoded at the training size, or None (keep the file's)."""
    if not cfg.store_height:
        return None
    return lambda data: stored_at(data, cfg.store_height, cfg.store_width, cfg.store_quality)


def _stored_size(cfg: PrepareJobConfig) -> dict:
    return ({"stored_size": {"height": cfg.store_height, "width": cfg.store_width, "quality": cfg.store_quality}}
            if cfg.store_height else {})


def _stored(records: Iterable[dict], store: Callable[[bytes], bytes] | None, threads: int) -> Iterator[dict]:
    """``records`` with their images re-encoded by ``store`` on ``threads`` threads (in order)."""
    if store is None:
        yield from records
        return

    def one(rec: dict) -> dict:
        return {**rec, "image": store(rec["image"])}

    yield from ordered_map(one, records, threads)


def prepare(cfg: PrepareJobConfig) -> dict:
    """Write the source's shards and manifest; return the manifest (+ out_dir, wall time)."""
    out_dir = Path(cfg.out_dir or Path(cfg.run_dir) / "data")
    t0 = time.time()
    if cfg.source == "synthetic":
        planned = planned_images(cfg.synthetic)
        records = _progress(_stored(generate(cfg.synthetic), _store(cfg), cfg.read_threads), int(planned.sum()),
                            "synthetic images", planned=planned)
        extra = _stored_size(cfg) or None
    else:
        records, extra = _listed_records(cfg)
    try:
        manifest = write_dataset(records, out_dir, source=cfg.source, rows_per_group=cfg.rows_per_group,
                                 groups_per_shard=cfg.groups_per_shard, extra=extra)
    except BaseException:
        # no manifest was written, so nothing here is usable: leave no half dataset behind
        remove_shards(out_dir)
        raise
    manifest["out_dir"] = str(out_dir)
    manifest["wall_time_s"] = time.time() - t0
    for split, info in manifest["splits"].items():
        skipped = manifest.get("skipped", {}).get("splits", {}).get(split, {}).get("images", 0)
        log.info(f"{split}: {info['images']} images, {info['identities']} identities, {info['cameras']} cameras, "
                 f"{len(info['shards'])} shards, {skipped} skipped")
    if manifest.get("skipped", {}).get("images"):
        s = manifest["skipped"]
        log.info(f"skipped {s['images']} of {s['of_images']} images ({s['error_rate']:.3%}, "
                 f"max_error_rate {s['max_error_rate']:g}): " +
                 "; ".join(f"{split} {v['reasons']} e.g. {[e['path'] for e in v['examples']]}"
                           for split, v in s["splits"].items()))
    log.info(f"wrote {out_dir / 'manifest.json'} in {manifest['wall_time_s']:.1f} s")
    return manifest
