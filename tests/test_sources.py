"""Public-layout readers: small fake trees in each layout, with real JPEG bytes."""

import io
import zlib
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from reidscale.data.sources.image_files import SkipLog, file_records
from reidscale.data.sources.image_folder import image_folder
from reidscale.data.sources.market1501 import dukemtmc, market1501
from reidscale.data.sources.msmt17 import msmt17
from reidscale.data.sources.veri776 import veri776


def jpeg(seed: int, h: int = 24, w: int = 12) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write(root, rel, data=None):
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data if data is not None else jpeg(zlib.crc32(rel.encode())))
    return path


def records(base, listing):
    skips = SkipLog(len(listing.entries), max_error_rate=1.0)
    return list(file_records(listing.entries, base, skips, workers=2)), skips


MARKET = {
    "bounding_box_train": ["0002_c1s1_000451_03.jpg", "0002_c2s1_000301_01.jpg", "0007_c3s3_077419_03.jpg",
                           "0007_c6s3_085567_02.jpg", "0010_c1s1_001051_01.jpg"],
    "query": ["0003_c1s1_000551_00.jpg", "0005_c4s1_001901_00.jpg"],
    "bounding_box_test": ["0003_c2s1_000626_01.jpg", "0005_c5s1_002101_02.jpg", "0005_c1s1_001951_03.jpg",
                          "0000_c1s1_000151_01.jpg", "0000_c3s1_000551_03.jpg", "-1_c1s1_000401_03.jpg",
                          "-1_c5s1_004001_04.jpg"],
}


@pytest.fixture
def market_tree(tmp_path):
    # the archive's own extra level: root/Market-1501-v15.09.15/bounding_box_train/...
    for folder, names in MARKET.items():
        for name in names:
            write(tmp_path / "Market-1501-v15.09.15", f"{folder}/{name}")
    (tmp_path / "Market-1501-v15.09.15" / "bounding_box_test" / "Thumbs.db").write_bytes(b"\0")
    return tmp_path


def test_market1501_splits_identities_and_cameras_follow_the_file_names(market_tree):
    base, listing = market1501(market_tree)
    assert base.name == "Market-1501-v15.09.15"
    recs, _ = records(base, listing)
    by_split = Counter(r["split"] for r in recs)
    assert by_split == {"train": 5, "query": 2, "gallery": 5}
    train = [r for r in recs if r["split"] == "train"]
    assert [(r["identity"], r["camera"], r["label"]) for r in train] == [
        (2, 0, 0), (2, 1, 0), (7, 2, 1), (7, 5, 1), (10, 0, 2)]
    assert {(r["identity"], r["camera"]) for r in recs if r["split"] == "query"} == {(3, 0), (5, 3)}
    assert all(r["label"] == -1 for r in recs if r["split"] != "train")
    first = train[0]
    assert first["path"] == "bounding_box_train/0002_c1s1_000451_03.jpg"
    assert first["image"] == (base / first["path"]).read_bytes()  # stored as is, not re-encoded
    assert (first["width"], first["height"]) == (12, 24)


def test_market1501_drops_junk_and_keeps_distractors_in_the_gallery(market_tree):
    base, listing = market1501(market_tree)
    assert listing.junk == 2
    recs, _ = records(base, listing)
    assert all(r["identity"] != -1 for r in recs)
    distractors = [r for r in recs if r["identity"] == 0]
    assert len(distractors) == 2 and {r["split"] for r in distractors} == {"gallery"}
    # records come grouped by identity inside each split
    gallery = [r["identity"] for r in recs if r["split"] == "gallery"]
    assert gallery == sorted(gallery)


def test_a_folder_that_is_not_the_layout_is_refused_naming_what_is_missing(tmp_path):
    (tmp_path / "bounding_box_train").mkdir()
    with pytest.raises(FileNotFoundError, match="query/ is missing"):
        market1501(tmp_path)
    with pytest.raises(FileNotFoundError, match="no bounding_box_train"):
        market1501(tmp_path / "bounding_box_train")


def test_an_unparsable_name_is_skipped_not_guessed(market_tree):
    write(market_tree / "Market-1501-v15.09.15", "query/IMG_1234.jpg")
    base, listing = market1501(market_tree)
    assert [(s.split, s.path, s.reason) for s in listing.skipped] == [("query", "query/IMG_1234.jpg", "bad_name")]


def test_dukemtmc_names_and_eight_cameras(tmp_path):
    for rel in ["bounding_box_train/0001_c2_f0046182.jpg", "bounding_box_train/0001_c8_f0099999.jpg",
                "bounding_box_train/0005_c5_f0051341.jpg", "query/0008_c1_f0047302.jpg",
                "bounding_box_test/0008_c7_f0071412.jpg", "bounding_box_test/0000_c3_f0033333.jpg"]:
        write(tmp_path / "DukeMTMC-reID", rel)
    base, listing = dukemtmc(tmp_path)
    recs, _ = records(base, listing)
    assert [(r["split"], r["identity"], r["camera"], r["label"]) for r in recs] == [
        ("train", 1, 1, 0), ("train", 1, 7, 0), ("train", 5, 4, 1),
        ("query", 8, 0, -1), ("gallery", 0, 2, -1), ("gallery", 8, 6, -1)]


@pytest.fixture
def msmt_tree(tmp_path):
    base = tmp_path / "MSMT17_V1"
    lists = {
        "list_train.txt": ["0000/0000_000_01_0303morning_0015_0.jpg 0", "0000/0000_001_05_0303morning_0016_0.jpg 0",
                           "0001/0001_000_15_0303noon_0001_1.jpg 1"],
        "list_val.txt": ["0001/0001_001_03_0303noon_0002_0.jpg 1"],
        "list_query.txt": ["0000/0000_000_02_0303afternoon_0001_0.jpg 0"],
        "list_gallery.txt": ["0000/0000_001_09_0303afternoon_0002_0.jpg 0",
                             "0002/0002_000_11_0303afternoon_0003_0.jpg 2"],
    }
    for name, lines in lists.items():
        folder = "train" if name in ("list_train.txt", "list_val.txt") else "test"
        for line in lines:
            write(base, f"{folder}/{line.split()[0]}")
        (base / name).write_text("\n".join(lines) + "\n")
    return tmp_path


def test_msmt17_reads_the_lists_and_takes_the_camera_from_the_name(msmt_tree):
    base, listing = msmt17(msmt_tree)
    recs, _ = records(base, listing)
    assert [(r["split"], r["identity"], r["camera"], r["label"]) for r in recs] == [
        ("train", 0, 0, 0), ("train", 0, 4, 0), ("train", 1, 14, 1),
        ("query", 0, 1, -1), ("gallery", 0, 8, -1), ("gallery", 2, 10, -1)]
    assert recs[0]["path"] == "train/0000/0000_000_01_0303morning_0015_0.jpg"
    assert recs[3]["path"].startswith("test/")


def test_msmt17_val_images_join_train_only_when_asked(msmt_tree):
    base, listing = msmt17(msmt_tree, include_val=True)
    train = [e for e in listing.entries if e.split == "train"]
    assert len(train) == 4 and [e.identity for e in train] == [0, 0, 1, 1]


def test_veri776_lists_name_the_split_files(tmp_path):
    base = tmp_path / "VeRi"
    files = {"image_train": ["0001_c001_00016450_0.jpg", "0001_c002_00016470_0.jpg", "0003_c019_00029615_1.jpg"],
             "image_query": ["0002_c002_00030600_0.jpg"],
             "image_test": ["0002_c003_00084280_0.jpg", "0002_c020_00084600_0.jpg", "0004_c004_00073460_0.jpg"]}
    for folder, names in files.items():
        for name in names:
            write(base, f"{folder}/{name}")
    # a file in the folder but not in the list is not part of the split
    write(base, "image_train/0009_c005_00000000_0.jpg")
    for folder, list_name in (("image_train", "name_train.txt"), ("image_query", "name_query.txt"),
                              ("image_test", "name_test.txt")):
        (base / list_name).write_text("\n".join(files[folder]) + "\n")
    found, listing = veri776(base)
    recs, _ = records(found, listing)
    assert [(r["split"], r["identity"], r["camera"], r["label"]) for r in recs] == [
        ("train", 1, 0, 0), ("train", 1, 1, 0), ("train", 3, 18, 1), ("query", 2, 1, -1),
        ("gallery", 2, 2, -1), ("gallery", 2, 19, -1), ("gallery", 4, 3, -1)]


def test_image_folder_numbers_named_identities_and_reads_cameras(tmp_path):
    for rel in ["alice/a.jpg", "alice/b.JPG", "bob/1.png", "carol/x.jpg", "carol/notes.txt"]:
        data = None
        if rel.endswith(".png"):
            buf = io.BytesIO()
            Image.new("RGB", (10, 20), "red").save(buf, "PNG")
            data = buf.getvalue()
        write(tmp_path, rel, data)
    csv = tmp_path / "cams.csv"
    csv.write_text("path,camera\nalice/a.jpg,3\n./bob/1.png,1\n")
    base, listing = image_folder(tmp_path, cameras_csv=csv)
    recs, _ = records(base, listing)
    assert [(r["path"], r["identity"], r["camera"], r["label"], r["split"]) for r in recs] == [
        ("alice/a.jpg", 0, 3, 0, "train"), ("alice/b.JPG", 0, -1, 0, "train"),
        ("bob/1.png", 1, 1, 1, "train"), ("carol/x.jpg", 2, -1, 2, "train")]
    assert listing.notes["images_without_camera"] == 2


def test_image_folder_with_split_folders_and_integer_identities(tmp_path):
    for rel in ["train/12/a.jpg", "train/40/b.jpg", "query/77/q.jpg", "gallery/77/g.jpg", "gallery/78/h.jpg"]:
        write(tmp_path, rel)
    base, listing = image_folder(tmp_path)
    assert [(e.split, e.identity) for e in listing.entries] == [
        ("train", 12), ("train", 40), ("query", 77), ("gallery", 77), ("gallery", 78)]


def test_image_folder_refuses_a_bad_cameras_line_naming_it(tmp_path):
    write(tmp_path, "a/1.jpg")
    csv = tmp_path / "cams.csv"
    csv.write_text("a/1.jpg,front\n")
    with pytest.raises(ValueError, match="cams.csv:1"):
        image_folder(tmp_path, cameras_csv=csv)
