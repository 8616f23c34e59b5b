"""MSMT17 (V1 or V2): list files name every image and its identity.

    <root>/list_train.txt  list_val.txt     lines "0000/0000_000_01_0303morning_0015_0.jpg 0",
    <root>/list_query.txt  list_gallery.txt  relative to the train or the test folder
    <root>/train/ and test/                  (V1; V2: mask_train_v2/ and mask_test_v2/)

The label on each line is the identity; train and test identities are both numbered from
0, so identity 5 in train and identity 5 in the gallery are different people (identities
never cross splits in a ReID protocol; ``path`` keeps the folder). The camera is the third
``_`` field of the file name (1-15), numbered from 0 here. ``list_val.txt`` holds more
images of the train identities; by the usual protocol they are left out
(``include_val=True`` adds them to train, torchreid's ``combineall`` for this set).
"""

from __future__ import annotations

from pathlib import Path

from reidscale.data.sources.image_files import Entry, Listing, Skip, find_layout_root, merge

VERSIONS = {"MSMT17_V1": ("train", "test"), "MSMT17_V2": ("mask_train_v2", "mask_test_v2")}
LISTS = {"train": "list_train.txt", "val": "list_val.txt", "query": "list_query.txt", "gallery": "list_gallery.txt"}


def _folders(base: Path) -> tuple[str, str]:
    for train, test in VERSIONS.values():
        if (base / train).is_dir() and (base / test).is_dir():
            return train, test
    raise FileNotFoundError(f"{base} is not an MSMT17 folder: none of {list(VERSIONS.values())} are there")


def _read_list(base: Path, list_name: str, folder: str, split: str) -> Listing:
    path = base / list_name
    if not path.is_file():
        raise FileNotFoundError(f"{base} is not an MSMT17 folder: {list_name} is missing")
    entries, skipped = [], []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            rel, identity = line.split()
            camera = int(rel.rsplit("/", 1)[-1].split("_")[2]) - 1
            entries.append(Entry(split, int(identity), camera, f"{folder}/{rel}"))
        except (ValueError, IndexError):
            skipped.append(Skip(split, f"{list_name}:{number}", "bad_name"))
    return Listing(entries, skipped)


def msmt17(root: str | Path, include_val: bool = False) -> tuple[Path, Listing]:
    """(dataset folder, listing); ``root`` holds the list files (or is the folder above it)."""
    base = find_layout_root(root, LISTS["train"], "MSMT17")
    train, test = _folders(base)
    parts = [_read_list(base, LISTS["train"], train, "train")]
    if include_val:
        parts.append(_read_list(base, LISTS["val"], train, "train"))
    parts += [_read_list(base, LISTS["query"], test, "query"), _read_list(base, LISTS["gallery"], test, "gallery")]
    return base, merge(parts)
