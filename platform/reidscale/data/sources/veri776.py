"""VeRi-776 (vehicles): image folders plus name lists.

    <root>/image_train/  name_train.txt    lists hold one file name a line
    <root>/image_query/  name_query.txt
    <root>/image_test/   name_test.txt     the gallery

File names ``0002_c002_00030600_0.jpg``: vehicle, camera (1-20, numbered from 0 here),
frame, index. The set has no junk or distractor identities (fast-reid's VeRi reader). A
folder without its list file is read by listing the folder.
"""

from __future__ import annotations

import re
from pathlib import Path

from reidscale.data.sources.image_files import Listing, find_layout_root, list_images, merge, parse_names

SPLITS = {"train": ("image_train", "name_train.txt"), "query": ("image_query", "name_query.txt"),
          "gallery": ("image_test", "name_test.txt")}
NAME = re.compile(r"(\d+)_c(\d+)_")


def _names(base: Path, folder: str, list_name: str) -> list[str]:
    if not (base / folder).is_dir():
        raise FileNotFoundError(f"{base} is not a VeRi-776 folder: {folder}/ is missing")
    path = base / list_name
    if path.is_file():
        return [f"{folder}/{line.strip()}" for line in path.read_text().splitlines() if line.strip()]
    return list_images(base / folder, base)


def veri776(root: str | Path) -> tuple[Path, Listing]:
    """(dataset folder, listing) of a VeRi-776 tree."""
    base = find_layout_root(root, SPLITS["train"][0], "VeRi-776")
    return base, merge(
        parse_names(split, _names(base, folder, list_name), NAME, lambda m: (int(m.group(1)), int(m.group(2)) - 1))
        for split, (folder, list_name) in SPLITS.items()
    )
