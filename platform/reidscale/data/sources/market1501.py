"""Market-1501 and DukeMTMC-reID: the ``bounding_box_*`` folder layout.

    <root>/bounding_box_train/   train split
    <root>/query/                query split
    <root>/bounding_box_test/    gallery split

File names carry identity and camera: Market-1501 ``0002_c1s1_000451_03.jpg`` (person,
camera 1-6, sequence, frame, box), DukeMTMC-reID ``0005_c2_f0046985.jpg`` (person, camera
1-8, frame). As in torchreid: identity ``-1`` marks junk boxes and is dropped; identity
``0`` marks distractors (Market's background boxes) and is kept, in the gallery that is
where they live. Cameras are numbered from 0 (file camera - 1). ``root`` may also be the
folder above (``market1501/`` holding ``Market-1501-v15.09.15/``).
"""

from __future__ import annotations

import re
from pathlib import Path

from reidscale.data.sources.image_files import Listing, find_layout_root, list_images, merge, parse_names

FOLDERS = {"train": "bounding_box_train", "query": "query", "gallery": "bounding_box_test"}
MARKET_NAME = re.compile(r"(-?\d+)_c(\d+)s\d+_")
DUKE_NAME = re.compile(r"(-?\d+)_c(\d+)_f?\d+")
JUNK = -1


def _identity_camera(match: re.Match) -> tuple[int, int] | None:
    identity, camera = int(match.group(1)), int(match.group(2))
    return None if identity == JUNK else (identity, camera - 1)


def _listing(root: str | Path, pattern: re.Pattern, layout: str) -> tuple[Path, Listing]:
    base = find_layout_root(root, FOLDERS["train"], layout)
    for folder in FOLDERS.values():
        if not (base / folder).is_dir():
            raise FileNotFoundError(f"{base} is not a {layout} folder: {folder}/ is missing")
    return base, merge(parse_names(split, list_images(base / folder, base), pattern, _identity_camera)
                       for split, folder in FOLDERS.items())


def market1501(root: str | Path) -> tuple[Path, Listing]:
    """(dataset folder, listing) of a Market-1501 tree; paths in the listing are relative to the folder."""
    return _listing(root, MARKET_NAME, "Market-1501")


def dukemtmc(root: str | Path) -> tuple[Path, Listing]:
    """(dataset folder, listing) of a DukeMTMC-reID tree."""
    return _listing(root, DUKE_NAME, "DukeMTMC-reID")
