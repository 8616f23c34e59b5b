"""A generic folder of identities: ``<root>/<identity>/<image>``, cameras from an optional CSV.

    <root>/<identity>/<image>                 every image goes to one split (``split``), or
    <root>/{train,query,gallery}/<identity>/<image>   when any of those folders exists

Identity folder names that are all integers are the identities; otherwise the sorted names
are numbered 0..N-1 over all splits (so a name is the same identity in query and gallery;
``path`` keeps the name). ``cameras_csv`` has lines ``path,camera`` (path relative to
``root``, as in the records; an optional header line ``path,camera``); images it does not
name get camera -1, and so does every image without a CSV. Evaluation drops same-camera
matches, so a query/gallery set needs real cameras.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from reidscale.data.shards import SPLITS
from reidscale.data.sources.image_files import IMAGE_SUFFIXES, Entry, Listing, list_images, sort_entries

UNKNOWN_CAMERA = -1


def read_cameras(path: str | Path) -> dict[str, int]:
    """``path,camera`` lines → {relative path: camera}; a bad line raises naming its number."""
    cameras = {}
    with open(path, newline="") as fh:
        for number, row in enumerate(csv.reader(fh), 1):
            if not row or (number == 1 and [c.strip().lower() for c in row] == ["path", "camera"]):
                continue
            if len(row) != 2 or not re.fullmatch(r"-?\d+", row[1].strip()):
                raise ValueError(f"{path}:{number}: expected 'path,camera' with an integer camera, got {row!r}")
            cameras[row[0].strip().removeprefix("./")] = int(row[1])
    return cameras


def image_folder(root: str | Path, split: str = "train", cameras_csv: str | Path = "") -> tuple[Path, Listing]:
    """(root, listing) of an identity-per-folder tree."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"root {root} is not a directory")
    split_dirs = {s: root / s for s in SPLITS if (root / s).is_dir()} or {split: root}
    found: list[tuple[str, str, list[str]]] = []  # (split, identity folder name, image paths)
    for s, folder in split_dirs.items():
        for sub in sorted(d for d in folder.iterdir() if d.is_dir()):
            images = list_images(sub, root, IMAGE_SUFFIXES)
            if images:
                found.append((s, sub.name, images))
    if not found:
        raise FileNotFoundError(f"root {root}: no <identity>/<image> folders with images ({', '.join(IMAGE_SUFFIXES)})")
    names = sorted({name for _, name, _ in found})
    integers = all(re.fullmatch(r"-?\d+", n) for n in names)
    identity_of = {n: int(n) if integers else i for i, n in enumerate(names)}
    cameras = read_cameras(cameras_csv) if cameras_csv else {}
    entries = [Entry(s, identity_of[name], cameras.get(p, UNKNOWN_CAMERA), p) for s, name, paths in found for p in paths]
    notes = {"identities_from": "folder names (integers)" if integers else "sorted folder names, numbered from 0",
             "images_without_camera": sum(e.camera == UNKNOWN_CAMERA for e in entries)}
    return root, Listing(sort_entries(entries), [], 0, notes)
