import io

import numpy as np
from PIL import Image

from reidscale.data.transforms import TransformConfig, decode, decode_batch


def _jpeg(h=40, w=20, seed=0):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def test_decode_resizes_and_normalises_with_given_stats():
    cfg = TransformConfig(height=32, width=16, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    batch = {"image": np.array([_jpeg()], dtype=object), "identity": np.array([7])}
    out = decode_batch(batch, cfg, train=False)
    assert out["image"].shape == (1, 3, 32, 16) and out["image"].dtype == np.float32
    pixels = decode(_jpeg(), 32, 16).astype(np.float32) / 255
    expected = ((pixels - 0.5) / 0.25).transpose(2, 0, 1)
    np.testing.assert_allclose(out["image"][0], expected, atol=1e-5)
    assert out["identity"].tolist() == [7] and out["decode_ok"].tolist() == [True]


def test_corrupt_truncated_and_non_image_rows_are_flagged_not_dropped():
    good = _jpeg()
    batch = {"image": np.array([good, good[: len(good) // 3], b"not an image", good], dtype=object)}
    out = decode_batch(batch, TransformConfig(height=32, width=16), train=True, seed=0)
    assert out["decode_ok"].tolist() == [True, False, False, True]
    assert out["image"].shape[0] == 4
    assert not out["image"][2].any()


def test_decompression_bomb_is_refused():
    buf = io.BytesIO()
    Image.new("L", (9000, 9000)).save(buf, "PNG")  # 81 Mpixel, compresses to ~100 kB
    assert decode(buf.getvalue(), 32, 16) is None


def test_train_augmentation_changes_pixels_but_not_shape():
    cfg = TransformConfig(height=32, width=16, flip_prob=1.0, pad=4, random_erasing_prob=1.0)
    batch = {"image": np.array([_jpeg()] * 2, dtype=object)}
    plain = decode_batch(batch, cfg, train=False)["image"]
    aug = decode_batch(batch, cfg, train=True, seed=1)["image"]
    assert aug.shape == plain.shape
    assert not np.allclose(aug, plain)


def test_fast_batch_path_equals_the_plain_composition_with_the_same_draws():
    from reidscale.data.transforms import augment, to_tensor_layout

    cfg = TransformConfig(height=32, width=16, pad=3, flip_prob=0.5, random_erasing_prob=0.7)
    images = [_jpeg(h=48, w=24, seed=s) for s in range(12)]
    batch = {"image": np.array(images[:5] + [b"broken"] + images[5:], dtype=object)}
    out = decode_batch(batch, cfg, train=True, seed=11)
    rng = np.random.default_rng(11)
    expected = [to_tensor_layout(augment(decode(d, 32, 16).astype(np.float32) / 255.0, cfg, rng), cfg)
                for d in images]
    np.testing.assert_array_equal(np.delete(out["image"], 5, axis=0), np.stack(expected))
    assert out["decode_ok"].tolist() == [True] * 5 + [False] + [True] * 7


def test_uint8_decode_then_normalise_batch_matches_the_float_path():
    """What the training pipeline ships (uint8) and normalises per batch equals decoding to float."""
    from reidscale.data.transforms import normalise_batch

    cfg = TransformConfig(height=32, width=16, pad=2)
    batch = {"image": np.array([_jpeg(seed=s) for s in range(4)], dtype=object)}
    as_uint8 = decode_batch(batch, cfg, train=False, normalise=False)["image"]
    assert as_uint8.dtype == np.uint8
    np.testing.assert_allclose(normalise_batch(as_uint8, cfg), decode_batch(batch, cfg, train=False)["image"],
                               rtol=0, atol=1e-6)
    # with augmentation: same draws; only an erased box may differ, by < half a grey level
    aug8 = normalise_batch(decode_batch(batch, cfg, train=True, seed=3, normalise=False)["image"], cfg)
    augf = decode_batch(batch, cfg, train=True, seed=3)["image"]
    assert np.abs(aug8 - augf).max() <= 0.5 / 255 / min(cfg.std) + 1e-6


def _blocks(h=48, w=24):
    """An asymmetric picture of flat 8×8 blocks (so JPEG keeps it, and any rotation shows)."""
    rng = np.random.default_rng(5)
    return np.kron(rng.integers(0, 256, (h // 8, w // 8, 3), dtype=np.uint8), np.ones((8, 8, 1), np.uint8))


def _jpeg_with_orientation(pixels, orientation=None):
    buf = io.BytesIO()
    exif = Image.Exif()
    if orientation is not None:
        exif[0x0112] = orientation
    Image.fromarray(pixels).save(buf, "JPEG", quality=95, exif=exif.tobytes())
    return buf.getvalue()


import pytest  # noqa: E402


@pytest.mark.parametrize("orientation, quarter_turns", [(6, -1), (8, 1)])
def test_exif_rotated_jpeg_decodes_upright_and_reports_its_displayed_size(orientation, quarter_turns):
    """EXIF 6: the stored rows must turn 90° clockwise to display (np.rot90 k=-1); 8: counter-clockwise."""
    from reidscale.data.sources.image_files import check_image

    stored = _blocks()  # 48 high, 24 wide as stored
    plain = decode(_jpeg_with_orientation(stored), 48, 24)
    expected = np.rot90(plain, k=quarter_turns)  # same JPEG stream, so the same decoded samples
    tagged = _jpeg_with_orientation(stored, orientation)
    assert check_image(tagged) == (48, 24)  # (width, height) displayed: the rotation swaps them
    got = decode(tagged, 24, 48)  # (height, width) = the displayed size: no resize happens
    np.testing.assert_array_equal(got, expected)
    assert not np.array_equal(got, np.rot90(plain, k=-quarter_turns))
    # the batch path (Ray Data tasks, validation, embed_images) decodes the same pixels
    cfg = TransformConfig(height=24, width=48)
    batch = decode_batch({"image": np.array([tagged], dtype=object)}, cfg, train=False, normalise=False)
    np.testing.assert_array_equal(batch["image"][0], expected.transpose(2, 0, 1))


@pytest.mark.parametrize("fmt, dtype, mode", [("PNG", np.uint16, "I;16"), ("TIFF", np.int32, "I")])
def test_sixteen_bit_greyscale_keeps_its_gradient_in_eight_bits(fmt, dtype, mode):
    """16-bit PNG (PIL mode I;16), and 16-bit values in a 32-bit greyscale TIFF (mode I, as older
    Pillow opened 16-bit PNGs): the 8-bit value of each pixel is its high byte."""
    y, x = np.mgrid[0:16, 0:64]
    gradient = (x * 1024 + y * 60).astype(np.uint16)  # 0 .. 65412 left to right
    buf = io.BytesIO()
    Image.fromarray(gradient.astype(dtype)).save(buf, fmt)
    assert Image.open(io.BytesIO(buf.getvalue())).mode == mode  # really a 16-bit greyscale file
    got = decode(buf.getvalue(), 16, 64)
    expected = np.repeat((gradient // 256).astype(np.uint8)[:, :, None], 3, axis=2)
    np.testing.assert_array_equal(got, expected)
    assert got.min() == 0 and got.max() == 255 and len(np.unique(got)) > 200  # not a white sheet


# --- the decoders: simplejpeg where it applies, Pillow as reference and fallback -------------

def _photo_like(h, w, seed=0):
    """Smooth shading, sensor-like noise and a hard-edged patch: what the decoders' filters
    disagree on most (flat synthetic colour would hide any difference)."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([128 + 60 * np.sin(x / (7 + c) + y / (11 + 2 * c)) for c in range(3)], -1)
    img += rng.normal(0, 12, img.shape)
    img[h // 3 : h // 2, w // 4 : 3 * w // 4] = (200, 40, 40)
    return np.clip(img, 0, 255).astype(np.uint8)


def _encode(pixels, mode="RGB", **save):
    buf = io.BytesIO()
    Image.fromarray(pixels).convert(mode).save(buf, "JPEG", quality=90, **save)
    return buf.getvalue()


@pytest.fixture
def without_simplejpeg(monkeypatch):
    from reidscale.data import transforms

    monkeypatch.setattr(transforms, "simplejpeg", None)


ENCODINGS = {"4:2:0": {}, "4:4:4": {"subsampling": 0}, "progressive": {"progressive": True}, "grey": {"mode": "L"},
             "CMYK": {"mode": "CMYK"}}


@pytest.mark.parametrize("encoding", sorted(ENCODINGS))
@pytest.mark.parametrize("stored, target", [((64, 32), (64, 32)), ((40, 20), (64, 32)), ((200, 100), (64, 32)),
                                            ((100, 300), (64, 32))])
def test_simplejpeg_and_the_pillow_fallback_decode_the_same_pixels(encoding, stored, target, monkeypatch):
    from reidscale.data import transforms

    assert transforms.simplejpeg is not None, "simplejpeg is a dependency (pyproject.toml)"
    data = _encode(_photo_like(*stored), **ENCODINGS[encoding])
    for scaled in (True, False):
        fast = decode(data, *target, scaled=scaled)
        assert fast is not None and fast.shape == (*target, 3)
        monkeypatch.setattr(transforms, "simplejpeg", None)
        np.testing.assert_array_equal(fast, decode(data, *target, scaled=scaled))
        monkeypatch.undo()


@pytest.mark.parametrize("stored", [(512, 256), (600, 300), (1024, 512), (768, 512)])
def test_scaled_decode_stays_within_three_grey_levels_of_a_full_decode(stored):
    """Decoding a large JPEG at 1/2..1/8 scale in the DCT domain, then resizing, differs from
    resizing the full decode (Pillow's antialiased bilinear) by a mean of < 3 levels of 255."""
    data = _encode(_photo_like(*stored, seed=1))
    scaled, full = decode(data, 256, 128), decode(data, 256, 128, scaled=False)
    diff = np.abs(scaled.astype(int) - full.astype(int))
    assert diff.mean() < 3.0 and np.percentile(diff, 99) <= 16
    assert diff.any()  # really a different decode: the check above can fail


def test_scaled_decode_is_a_transform_setting_the_batch_path_honours(without_simplejpeg):
    data = np.array([_encode(_photo_like(512, 256))], dtype=object)
    on = decode_batch({"image": data}, TransformConfig(), train=False, normalise=False)["image"]
    off = decode_batch({"image": data}, TransformConfig(scaled_decode=False), train=False, normalise=False)["image"]
    np.testing.assert_array_equal(off[0], decode(data[0], 256, 128, scaled=False).transpose(2, 0, 1))
    assert not np.array_equal(on, off)


def test_fused_augmentation_equals_flip_shift_then_erase_on_uint8(without_simplejpeg):
    """The uint8 batch path (flip, shift and layout in one copy) against the step-by-step
    _flip_shift on the decoded pixels, with the same draws; erased box at the mean's level."""
    from reidscale.data.transforms import _erase_box, _flip_shift

    cfg = TransformConfig(height=32, width=16, pad=5, flip_prob=0.5, random_erasing_prob=0.5)
    images = [_jpeg(h=48, w=24, seed=s) for s in range(16)]
    out = decode_batch({"image": np.array(images, dtype=object)}, cfg, train=True, seed=4, normalise=False)["image"]
    rng = np.random.default_rng(4)
    fill = np.round(np.asarray(cfg.mean) * 255).astype(np.uint8)
    for got, data in zip(out, images):
        expected = _flip_shift(decode(data, 32, 16), cfg, rng).transpose(2, 0, 1).copy()
        if rng.random() < cfg.random_erasing_prob and (box := _erase_box(32, 16, rng)) is not None:
            y, x, eh, ew = box
            expected[:, y : y + eh, x : x + ew] = fill[:, None, None]
        np.testing.assert_array_equal(got, expected)


def test_float_output_into_an_uncleared_array_equals_a_fresh_one():
    """The normalised path writes every element too: padding at level 0's value, a bad row zero."""
    cfg = TransformConfig(height=32, width=16, pad=4, flip_prob=0.5, random_erasing_prob=0.5)
    batch = {"image": np.array([_jpeg(seed=s) for s in range(6)] + [b"broken"], dtype=object)}
    out = np.full((7, 3, 32, 16), np.nan, np.float32)
    decode_batch(batch, cfg, train=True, seed=9, out=out)
    np.testing.assert_array_equal(out, decode_batch(batch, cfg, train=True, seed=9)["image"])
    assert not out[6].any()


@pytest.mark.parametrize("stored, target, scale", [((64, 32), (256, 128), 1), ((256, 128), (256, 128), 1),
                                                  ((512, 256), (256, 128), 2), ((300, 600), (256, 128), 1),
                                                  ((2048, 1024), (256, 128), 8), ((4096, 2048), (256, 128), 8)])
def test_draft_scale_follows_pillows_rule_and_takes_upscales_too(stored, target, scale, monkeypatch):
    """An upscaled crop (Market-1501's 128×64 to 256×128) must stay on simplejpeg, not fall back."""
    from reidscale.data import transforms

    assert transforms._draft_scale(stored[::-1], target[::-1]) == scale
    calls = []
    monkeypatch.setattr(transforms, "decode_pil", lambda *a, **k: calls.append(a))
    assert decode(_encode(_photo_like(*stored)), *target) is not None and not calls


def test_decoding_into_slices_of_one_array_equals_decoding_apart():
    """What a decode task holding several row groups does: each group into its slice of one
    array left as the last task wrote it (not cleared), with its own seed; the same bytes as
    separate outputs, padding and an undecodable row zero, and a bad ``out`` refused."""
    cfg = TransformConfig(height=32, width=16, pad=3, flip_prob=0.5, random_erasing_prob=0.7)
    first = {"image": np.array([_jpeg(seed=s) for s in range(3)] + [b"broken"], dtype=object)}
    second = {"image": np.array([_jpeg(seed=s) for s in range(3, 8)], dtype=object)}
    whole = np.full((9, 3, 32, 16), 201, np.uint8)  # no JPEG here holds level 201 in a corner
    a = decode_batch(first, cfg, train=True, seed=1, normalise=False, out=whole[:4])
    b = decode_batch(second, cfg, train=True, seed=2, normalise=False, out=whole[4:])
    np.testing.assert_array_equal(whole[:4], decode_batch(first, cfg, train=True, seed=1, normalise=False)["image"])
    np.testing.assert_array_equal(whole[4:], decode_batch(second, cfg, train=True, seed=2, normalise=False)["image"])
    assert a["image"].base is whole and b["image"].base is whole  # no copy
    assert a["decode_ok"].tolist() == [True, True, True, False] and not whole[3].any()
    # every shifted row's uncovered strips were written: the reference has them at level 0
    shifted = [i for i in range(9) if (whole[i] == 0).all(axis=(0, 2)).any() or (whole[i] == 0).all(axis=(0, 1)).any()]
    assert len(shifted) >= 5
    with pytest.raises(ValueError, match="out is uint8"):
        decode_batch(second, cfg, train=False, normalise=False, out=whole[:4])
    with pytest.raises(ValueError, match="needs float32"):
        decode_batch(second, cfg, train=False, out=whole[4:])
