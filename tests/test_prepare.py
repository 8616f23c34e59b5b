"""prepare(): sources to shards, bad input skipped and counted, the error-rate limit."""

import io
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from reidscale.config import ConfigError, load_config
from reidscale.data.prepare import PrepareJobConfig, prepare
from reidscale.data.shards import read_metadata, verify_split
from reidscale.data.sources.image_files import BadImage, TooManyBadImages, check_image

REPO = Path(__file__).resolve().parents[1]


def jpeg(seed=0, h=24, w=12) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def png_bomb() -> bytes:
    buf = io.BytesIO()
    Image.new("L", (9000, 9000)).save(buf, "PNG")  # 81 Mpixel declared, ~100 kB of file
    return buf.getvalue()


def market_tree(root: Path, bad: dict[str, bytes] | None = None) -> Path:
    """A Market-1501 tree: 8 train identities × 3 images, 4 test identities, plus ``bad`` files."""
    base = root / "Market-1501-v15.09.15"
    files = {}
    for pid in range(1, 9):
        for cam in range(1, 4):
            files[f"bounding_box_train/{pid:04d}_c{cam}s1_{pid * 100 + cam:06d}_01.jpg"] = jpeg(pid * 10 + cam)
    for pid in range(20, 24):
        files[f"query/{pid:04d}_c1s1_000100_00.jpg"] = jpeg(pid)
        for cam in (2, 3):
            files[f"bounding_box_test/{pid:04d}_c{cam}s1_000200_01.jpg"] = jpeg(pid * 10 + cam)
    files["bounding_box_test/0000_c4s1_000300_01.jpg"] = jpeg(99)
    files["bounding_box_test/-1_c4s1_000300_02.jpg"] = jpeg(98)
    files.update(bad or {})
    for rel, data in files.items():
        (base / rel).parent.mkdir(parents=True, exist_ok=True)
        (base / rel).write_bytes(data)
    return root


def config(root, out, **kw) -> PrepareJobConfig:
    overrides = [f"source={kw.pop('source', 'market1501')}", f"root={root}", f"out_dir={out}", "rows_per_group=6"]
    return load_config(PrepareJobConfig, overrides=overrides + [f"{k}={v}" for k, v in kw.items()])


def test_check_image_refuses_truncated_non_image_empty_and_bombs():
    good = jpeg(h=64, w=32)
    assert check_image(good) == (32, 64)
    for data, reason in [(good[: len(good) // 2], "truncated"), (b"GIF89a not really", "not_an_image"),
                         (b"hello, not an image", "not_an_image"), (b"", "empty"), (png_bomb(), "too_large")]:
        with pytest.raises(BadImage) as info:
            check_image(data)
        assert info.value.reason == reason
    with pytest.raises(BadImage, match="too_large"):
        check_image(good, max_pixels=1000)
    # a JPEG whose scan data is damaged in the middle (not just cut short)
    damaged = bytearray(good)
    damaged[len(good) // 3 : len(good) // 3 + 64] = b"\xff\xd9" * 32  # end-of-image markers mid-scan
    with pytest.raises(BadImage) as info:
        check_image(bytes(damaged))
    assert info.value.reason in ("corrupt", "truncated")


def test_bad_files_are_skipped_counted_and_reach_the_manifest(tmp_path):
    good = jpeg(5)
    bad = {
        "bounding_box_train/0009_c1s1_000901_01.jpg": good[: len(good) // 2],  # identity 9's only image: truncated
        "bounding_box_train/0003_c4s1_000304_01.jpg": b"<html>404</html>",
        "bounding_box_test/0021_c5s1_000500_01.jpg": jpeg(7, h=200, w=100),  # 20,000 px > max_image_pixels
    }
    root = market_tree(tmp_path / "src", bad)
    manifest = prepare(config(root, tmp_path / "out", max_error_rate=0.1, max_image_pixels=10_000))
    skipped = manifest["skipped"]
    assert skipped["images"] == 3 and skipped["of_images"] == 24 + 4 + 9 + 3  # junk is dropped, not counted
    assert skipped["splits"]["train"]["reasons"] == {"truncated": 1, "not_an_image": 1}
    assert skipped["splits"]["gallery"]["reasons"] == {"too_large": 1}
    assert {e["path"] for e in skipped["splits"]["train"]["examples"]} == {
        "bounding_box_train/0009_c1s1_000901_01.jpg", "bounding_box_train/0003_c4s1_000304_01.jpg"}
    assert manifest["junk_dropped"] == 1
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["skipped"] == skipped
    # identity 9 lost its only image: it is not a class, and labels stay contiguous
    assert manifest["num_classes"] == 8 and manifest["splits"]["train"]["images"] == 24
    meta = read_metadata(tmp_path / "out", "train")
    assert sorted(set(meta.column("label").to_pylist())) == list(range(8))
    assert 9 not in set(meta.column("identity").to_pylist())
    gallery = read_metadata(tmp_path / "out", "gallery")
    assert 0 in set(gallery.column("identity").to_pylist())  # the distractor
    verify_split(tmp_path / "out", "gallery")


def test_past_max_error_rate_the_job_fails_naming_rate_and_files_and_leaves_no_shards(tmp_path):
    bad = {f"bounding_box_train/{pid:04d}_c1s1_000001_01.jpg": b"not a jpeg" for pid in (30, 31, 32)}
    root = market_tree(tmp_path / "src", bad)
    out = tmp_path / "out"
    with pytest.raises(TooManyBadImages) as info:
        prepare(config(root, out, max_error_rate=0.05))
    message = str(info.value)
    assert "3 of 40 images skipped (7.50%)" in message
    assert "max_error_rate=0.05" in message and "0030_c1s1_000001_01.jpg" in message
    assert not out.exists() or not any(out.iterdir())


def test_the_job_exits_non_zero_with_the_message_and_summarises_skips(tmp_path):
    good = jpeg(3)
    root = market_tree(tmp_path / "src", {"query/0022_c2s1_000100_00.jpg": good[:40]})
    cmd = [sys.executable, str(REPO / "jobs" / "prepare_data.py"), "source=market1501", f"root={root}", "rows_per_group=6"]
    ok = subprocess.run(cmd + [f"out_dir={tmp_path / 'a'}", "max_error_rate=0.05", "--json"], capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["skipped"]["splits"]["query"]["reasons"] == {"truncated": 1}
    assert "skipped 1 of 38 images" in ok.stderr and "query/0022_c2s1_000100_00.jpg" in ok.stderr
    failed = subprocess.run(cmd + [f"out_dir={tmp_path / 'b'}", "max_error_rate=0"], capture_output=True, text=True)
    assert failed.returncode == 1
    assert "max_error_rate=0" in failed.stderr and "query/0022_c2s1_000100_00.jpg (truncated)" in failed.stderr


def test_a_file_source_needs_an_existing_root_named_in_the_error(tmp_path):
    with pytest.raises(ConfigError, match="root"):
        load_config(PrepareJobConfig, overrides=["source=msmt17"])
    with pytest.raises(ConfigError, match="root: .*not a directory"):
        load_config(PrepareJobConfig, overrides=["source=veri776", f"root={tmp_path / 'nope'}"])
    with pytest.raises(ConfigError, match="max_error_rate"):
        load_config(PrepareJobConfig, overrides=["max_error_rate=2"])


def test_shards_hold_the_file_bytes_clustered_by_identity(tmp_path):
    root = market_tree(tmp_path / "src")
    prepare(config(root, tmp_path / "out"))
    base = root / "Market-1501-v15.09.15"
    for shard in sorted((tmp_path / "out").glob("train-*.parquet")):
        f = pq.ParquetFile(shard)
        for g in range(f.num_row_groups):
            table = f.read_row_group(g, columns=["identity", "image", "path"])
            ids = table.column("identity").to_pylist()
            assert ids == sorted(ids)
            for data, rel in zip(table.column("image").to_pylist(), table.column("path").to_pylist()):
                assert data == (base / rel).read_bytes()


def test_the_demo_config_still_loads_and_describes_the_same_dataset():
    cfg = load_config(PrepareJobConfig, REPO / "configs" / "demo" / "prepare.yaml")
    assert cfg.source == "synthetic" and cfg.synthetic.num_identities == 400 and cfg.synthetic.images == "rendered"


@pytest.mark.parametrize("name", sorted(p.name for p in (REPO / "configs" / "datasets").glob("*.yaml")))
def test_every_dataset_config_loads_apart_from_its_root(name, tmp_path):
    cfg_path = REPO / "configs" / "datasets" / name
    load_config(PrepareJobConfig, cfg_path, [f"root={tmp_path}"] if "synthetic" not in name else [])


def test_an_empty_layout_is_refused_not_written(tmp_path):
    for folder in ("bounding_box_train", "query", "bounding_box_test"):
        (tmp_path / "src" / folder).mkdir(parents=True)
    with pytest.raises(FileNotFoundError, match="no images found"):
        prepare(config(tmp_path / "src", tmp_path / "out"))
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_an_exif_rotated_crop_is_recorded_with_its_displayed_size(tmp_path):
    """A 24 wide × 48 high stored JPEG tagged orientation 6 displays 48 wide × 24 high."""
    src = tmp_path / "src" / "7"
    src.mkdir(parents=True)
    exif = Image.Exif()
    exif[0x0112] = 6
    pixels = np.random.default_rng(1).integers(0, 255, (48, 24, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(src / "rotated.jpg", "JPEG", exif=exif.tobytes())
    Image.fromarray(pixels).save(src / "plain.jpg", "JPEG")
    prepare(config(tmp_path / "src", tmp_path / "out", source="folder"))
    table = pq.read_table(next((tmp_path / "out").glob("train-*.parquet")), columns=["path", "width", "height"])
    sizes = {p: (w, h) for p, w, h in zip(*(table.column(c).to_pylist() for c in ("path", "width", "height")))}
    assert sizes == {"7/plain.jpg": (24, 48), "7/rotated.jpg": (48, 24)}


def _bar_states(err: str) -> list[str]:
    return [s.strip() for s in err.replace("\r", "\n").split("\n") if "img" in s and "/" in s]


def test_synthetic_progress_counts_images_against_the_exact_total(tmp_path, capsys):
    # min 2 images but up to 6 cameras: some identities yield more than their drawn count
    cfg = load_config(PrepareJobConfig, overrides=[
        f"out_dir={tmp_path}", "synthetic.num_identities=40", "synthetic.height=32", "synthetic.width=16",
        "synthetic.images_per_identity_median=4", "synthetic.min_images_per_identity=2", "synthetic.seed=2"])
    manifest = prepare(cfg)
    total = sum(info["images"] for info in manifest["splits"].values())
    states = _bar_states(capsys.readouterr().err)
    assert states and f"{total}/{total}" in states[-1], states
    for state in states:  # the count never runs past the total shown beside it
        done, of = map(int, re.search(r"(\d+)/(\d+) \[", state).groups())
        assert done <= of


def test_file_source_progress_counts_skipped_images_and_logs_on_their_own_lines(tmp_path, capsys, monkeypatch):
    import logging

    from reidscale.data.prepare import _progress

    root = market_tree(tmp_path / "src", {"query/0022_c2s1_000100_00.jpg": jpeg(3)[:40]})
    prepare(config(root, tmp_path / "out", max_error_rate=0.05))
    assert "38/38" in _bar_states(capsys.readouterr().err)[-1]  # 37 written + 1 skipped

    def records():
        for i in range(5):
            if i == 3:
                logging.getLogger("ray.data").warning("Ray Data says hello")
            yield {"identity": 1}

    # Ray's logger as Ray sets it up in a fresh job: its own stderr handler, not propagating (an
    # earlier test in this process may have left one bound to a stream pytest has since closed)
    import sys

    for name in ("ray", "ray.data"):
        monkeypatch.setattr(logging.getLogger(name), "handlers", [logging.StreamHandler(sys.stderr)])
        monkeypatch.setattr(logging.getLogger(name), "propagate", False)
    list(_progress(records(), 5, "test images"))
    err = capsys.readouterr().err
    assert any(line == "Ray Data says hello" for line in err.replace("\r", "\n").split("\n")), repr(err)


def test_crops_stored_at_the_training_size_decode_as_the_files_would(tmp_path):
    """store_height/store_width: each crop is the decoder's view of its file (EXIF turn applied),
    resized and re-encoded; the shards keep the file's displayed size, the manifest the stored one."""
    from reidscale.data.shards import read_manifest
    from reidscale.data.transforms import decode

    src = tmp_path / "src" / "7"
    src.mkdir(parents=True)
    y, x = np.mgrid[0:96, 0:48]
    pixels = np.stack([x * 5, y * 2, (x + y) * 1.5], -1).astype(np.uint8)  # smooth: JPEG keeps it closely
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(pixels).save(src / "plain.jpg", "JPEG", quality=95)
    Image.fromarray(pixels).save(src / "rotated.jpg", "JPEG", quality=95, exif=exif.tobytes())
    Image.fromarray(pixels).save(src / "lossless.png", "PNG")
    prepare(config(tmp_path / "src", tmp_path / "out", source="folder", store_height=32, store_width=16))
    table = pq.read_table(next((tmp_path / "out").glob("train-*.parquet")), columns=["path", "image", "width", "height"])
    rows = {p: (img, w, h) for p, img, w, h in zip(*(table.column(c).to_pylist() for c in ("path", "image", "width", "height")))}
    assert {p: (w, h) for p, (_, w, h) in rows.items()} == {"7/plain.jpg": (48, 96), "7/rotated.jpg": (96, 48),
                                                           "7/lossless.png": (48, 96)}
    for path, (stored, _, _) in rows.items():
        assert Image.open(io.BytesIO(stored)).size == (16, 32) and Image.open(io.BytesIO(stored)).format == "JPEG"
        want = decode((src.parent / path).read_bytes(), 32, 16).astype(int)  # the file as an epoch would see it
        got = decode(stored, 32, 16).astype(int)
        assert np.abs(got - want).mean() < 2.0, path  # one JPEG generation at quality 95
    assert read_manifest(tmp_path / "out")["stored_size"] == {"height": 32, "width": 16, "quality": 95}


def test_synthetic_crops_can_be_stored_at_the_training_size(tmp_path):
    from reidscale.data.shards import read_manifest

    prepare(load_config(PrepareJobConfig, overrides=[f"out_dir={tmp_path}", "synthetic.num_identities=6",
                                                     "store_height=64", "store_width=32"]))
    table = pq.read_table(next(tmp_path.glob("train-*.parquet")), columns=["image", "width", "height"])
    assert {Image.open(io.BytesIO(b)).size for b in table.column("image").to_pylist()} == {(32, 64)}
    assert set(table.column("width").to_pylist()) == {64}  # the rendered crop's own size
    assert read_manifest(tmp_path)["stored_size"]["height"] == 64


@pytest.mark.parametrize("override, field", [(["store_height=256"], "store_height/store_width"),
                                             (["store_height=8", "store_width=4"], "at least 16"),
                                             (["store_height=64", "store_width=32", "store_quality=0"], "store_quality")])
def test_a_half_given_or_bad_stored_size_is_refused_before_any_work(override, field, tmp_path):
    with pytest.raises(ConfigError, match=field):
        load_config(PrepareJobConfig, overrides=[f"out_dir={tmp_path}", *override]).validate()
    assert not any(tmp_path.iterdir())
