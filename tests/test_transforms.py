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
