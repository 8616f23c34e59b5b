"""Image files on disk → checked records, shared by every public-layout reader.

A layout reader only lists its files as :class:`Entry` (split, identity, camera, relative
path), sorted by split and identity. :func:`file_records` then reads each file's bytes as
they are (never re-encoded), checks that they decode, numbers the train identities 0..C-1
and yields records ready for :func:`reidscale.data.shards.write_dataset`.

A file that cannot be used (unreadable, not an image, truncated or corrupt, a
decompression bomb, a name that does not parse) is skipped and counted in a
:class:`SkipLog`, which stops the job as soon as the skipped fraction passes
``max_error_rate`` (the total is known from the listing, so this is the final rate).
"""

from __future__ import annotations

import io
import re
import warnings
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Iterator, NamedTuple

from PIL import Image, UnidentifiedImageError

from reidscale.data.shards import SPLITS
from reidscale.data.transforms import MAX_IMAGE_PIXELS, oriented_size

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class Entry(NamedTuple):
    """One image file as a layout names it; ``path`` is relative to the dataset root."""

    split: str
    identity: int
    camera: int
    path: str


class Skip(NamedTuple):
    """A file the layout lists but that cannot become a record."""

    split: str
    path: str
    reason: str


class Listing(NamedTuple):
    """What a layout reader found: usable entries, files already refused, junk dropped on purpose."""

    entries: list[Entry]
    skipped: list[Skip]
    junk: int = 0
    # facts a person should read in the manifest (e.g. images without a known camera)
    notes: dict | None = None


class BadImage(ValueError):
    """The bytes are not a usable image; ``reason`` is a short tag for the tally."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason


class TooManyBadImages(ValueError):
    """More files were skipped than ``max_error_rate`` allows."""


def check_image(data: bytes, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[int, int]:
    """(width, height) of an image that decodes, else raise :class:`BadImage`.

    The size is the displayed one (EXIF orientation applied, as ``transforms.decode`` does),
    so the manifest's width/height describe the pixels training sees.

    Cheap on purpose: the size comes from the header and a bomb is refused before any
    pixel is decoded; a JPEG is then decoded at 1/8 scale (DCT scaling, which still reads
    the whole entropy-coded stream, so truncation shows), other formats in full (ReID
    crops are small). PIL refuses what ``transforms.decode`` would refuse at train time.
    """
    if not data:
        raise BadImage("empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width < 1 or height < 1 or width * height > max_pixels:
                raise BadImage("too_large", f"{width}x{height} pixels")
            oriented = oriented_size(img)  # before draft() shrinks img.size
            if img.format == "JPEG":
                img.draft("RGB", (max(1, width // 8), max(1, height // 8)))
            img.load()
    except BadImage:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise BadImage("too_large", str(exc)) from None
    except UnidentifiedImageError:
        raise BadImage("not_an_image") from None
    except Exception as exc:  # PIL raises OSError, SyntaxError, ValueError... for broken data
        raise BadImage("truncated" if "truncated" in str(exc).lower() else "corrupt", str(exc)) from None
    return oriented


class SkipLog:
    """Counts skipped files per split and reason, keeps the first few paths, enforces the rate."""

    def __init__(self, total: int, max_error_rate: float, examples: int = 5):
        self.total, self.max_error_rate, self.keep = total, max_error_rate, examples
        self.by_split: dict[str, Counter] = {}
        self.examples: dict[str, list[dict]] = {}

    @property
    def count(self) -> int:
        return sum(sum(c.values()) for c in self.by_split.values())

    def add(self, skip: Skip) -> None:
        self.by_split.setdefault(skip.split, Counter())[skip.reason] += 1
        examples = self.examples.setdefault(skip.split, [])
        if len(examples) < self.keep:
            examples.append({"path": skip.path, "reason": skip.reason})
        if self.total and self.count / self.total > self.max_error_rate:
            raise TooManyBadImages(self.message())

    def message(self) -> str:
        rate = self.count / max(self.total, 1)
        reasons = Counter()
        for c in self.by_split.values():
            reasons.update(c)
        examples = [f"{e['path']} ({e['reason']})" for ex in self.examples.values() for e in ex][: self.keep]
        return (f"{self.count} of {self.total} images skipped ({rate:.2%}), above max_error_rate="
                f"{self.max_error_rate:g} ({self.max_error_rate:.2%}); reasons: "
                f"{', '.join(f'{r} {n}' for r, n in reasons.most_common())}; e.g. {', '.join(examples)}")

    def summary(self) -> dict:
        """The manifest's ``skipped`` entry."""
        return {
            "images": self.count,
            "of_images": self.total,
            "error_rate": self.count / max(self.total, 1),
            "max_error_rate": self.max_error_rate,
            "splits": {
                split: {"images": sum(c.values()), "reasons": dict(c), "examples": self.examples[split]}
                for split, c in self.by_split.items()
            },
        }


def sort_entries(entries: Iterable[Entry]) -> list[Entry]:
    """Split by split (train, query, gallery), identity by identity, then by path."""
    return sorted(entries, key=lambda e: (SPLITS.index(e.split), e.identity, e.path))


def parse_names(split: str, names: Iterable[str], pattern: re.Pattern,
                parse: Callable[[re.Match], tuple[int, int] | None]) -> Listing:
    """One split's listing from relative paths, by ``pattern.match`` on each file name.

    ``parse(match)`` gives (identity, camera), or None to drop the file on purpose (junk).
    A name that does not match is skipped as ``bad_name``.
    """
    entries, skipped, junk = [], [], 0
    for rel in names:
        match = pattern.match(rel.rsplit("/", 1)[-1])
        if match is None:
            skipped.append(Skip(split, rel, "bad_name"))
            continue
        parsed = parse(match)
        if parsed is None:
            junk += 1
        else:
            entries.append(Entry(split, parsed[0], parsed[1], rel))
    return Listing(entries, skipped, junk)


def merge(listings: Iterable[Listing]) -> Listing:
    """One listing from several (one per split), entries sorted by :func:`sort_entries`."""
    listings = list(listings)
    return Listing(sort_entries(e for l in listings for e in l.entries),
                   [s for l in listings for s in l.skipped], sum(l.junk for l in listings))


def find_layout_root(root: str | Path, marker: str, layout: str) -> Path:
    """``root`` if it holds ``marker``, else its single sub-folder that does.

    Archives unpack with an extra level (``market1501/Market-1501-v15.09.15/...``); either works.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"root {root} is not a directory")
    if (root / marker).exists():
        return root
    found = [d for d in sorted(root.iterdir()) if d.is_dir() and (d / marker).exists()]
    if len(found) == 1:
        return found[0]
    where = f"several sub-folders have it: {[str(d) for d in found]}" if found else "nor does any sub-folder"
    raise FileNotFoundError(f"root {root} is not a {layout} folder: no {marker} in it, {where}")


def list_images(folder: Path, root: Path, suffixes: tuple[str, ...] = (".jpg",)) -> list[str]:
    """Relative (to ``root``, posix) paths of the image files directly in ``folder``, sorted."""
    return sorted(p.relative_to(root).as_posix() for p in folder.iterdir()
                  if p.suffix.lower() in suffixes and p.is_file())


def ordered_map(fn: Callable, items: Iterable, workers: int, ahead: int = 256) -> Iterator:
    """``map(fn, items)`` on a thread pool, in order, with at most ``ahead`` items in flight.

    Threads pay off here: file reads and PIL decoding release the GIL.
    """
    if workers <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(workers) as pool:
        pending: deque = deque()
        for item in items:
            pending.append(pool.submit(fn, item))
            if len(pending) >= ahead:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()


def file_records(entries: list[Entry], root: str | Path, skips: SkipLog, *,
                 max_pixels: int = MAX_IMAGE_PIXELS, workers: int = 2,
                 store: Callable[[bytes], bytes] | None = None) -> Iterator[dict]:
    """Read, check and label ``entries`` (sorted by :func:`sort_entries`); yield records.

    Record keys: image (the file's bytes, or ``store(bytes)``: prepare's crops re-encoded at
    the training size, done on the reading threads), identity, camera, split, label (0..C-1
    over the train identities that kept at least one image, in identity order; -1
    elsewhere), path, width, height (the file's). Bad files go to ``skips`` (which raises
    past its rate).
    """
    root = Path(root)

    def load(entry: Entry) -> tuple[Entry, bytes | None, object]:
        try:
            data = (root / entry.path).read_bytes()
        except OSError as exc:
            return entry, None, BadImage("unreadable", str(exc))
        try:
            size = check_image(data, max_pixels)
        except BadImage as exc:
            return entry, None, exc
        if store is not None:
            try:
                data = store(data)
            except ValueError as exc:
                return entry, None, BadImage("corrupt", str(exc))
        return entry, data, size

    next_label, last_train_identity = 0, None
    for entry, data, result in ordered_map(load, entries, workers):
        if isinstance(result, BadImage):
            skips.add(Skip(entry.split, entry.path, result.reason))
            continue
        label = -1
        if entry.split == "train":
            if entry.identity != last_train_identity:
                last_train_identity, next_label = entry.identity, next_label + 1
            label = next_label - 1
        width, height = result
        yield {"image": data, "identity": entry.identity, "camera": entry.camera, "split": entry.split,
               "label": label, "path": entry.path, "width": width, "height": height}
