"""Decode and augment image bytes into normalised CHW float32 arrays (numpy only).

These run inside Ray Data ``map_batches`` on CPU workers, so they avoid torch and keep
every step vectorisable per image. A row whose bytes do not decode is not dropped
silently: its ``decode_ok`` flag is False and the consumer counts it.

:func:`to_rgb` is the one place that turns a PIL image into the pixels a model sees (EXIF
orientation applied, 16-bit greyscale scaled to 8 bits, any mode to RGB): training,
validation, ``embed_images`` and prepare's size check (:func:`oriented_size`) all go
through it, so a crop cannot look different to one of them.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from reidscale.config import ConfigError

try:  # optional: the pure-Pillow path gives the same pixels, a little slower
    import simplejpeg
except ImportError:  # pragma: no cover - depends on the platform's wheels
    simplejpeg = None

# CLIP's statistics: the default for open_clip backbones
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# A decompression bomb is refused before it is decoded (pixels of the declared size).
MAX_IMAGE_PIXELS = 40_000_000


@dataclass
class TransformConfig:
    """Input size and augmentation (fast-reid / BoT defaults, scaled to the image size)."""

    height: int = 256
    width: int = 128
    flip_prob: float = 0.5
    pad: int = 10
    random_erasing_prob: float = 0.5
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    # decode large JPEGs at 1/2, 1/4 or 1/8 scale before resizing (see ``decode``)
    scaled_decode: bool = True

    def validate(self) -> None:
        if self.height < 16 or self.width < 16:
            raise ConfigError("height/width: at least 16 pixels")
        for name in ("flip_prob", "random_erasing_prob"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ConfigError(f"{name}: must be a probability in [0, 1]")
        if self.pad < 0:
            raise ConfigError("pad: must be >= 0")
        if any(s <= 0 for s in self.std):
            raise ConfigError("std: every value must be > 0")


EXIF_ORIENTATION = 0x0112
# orientations 5-8 rotate by 90 or 270 degrees: width and height swap
_SWAPS_AXES = {5, 6, 7, 8}
_SIXTEEN_BIT_MODES = {"I;16", "I;16L", "I;16B", "I;16N", "I"}


def exif_orientation(img: Image.Image) -> int:
    """The EXIF orientation tag (1-8; 1, the default, when absent or out of range)."""
    try:
        value = int(img.getexif().get(EXIF_ORIENTATION, 1))
    except Exception:  # a malformed EXIF block must not make a good image unusable
        return 1
    return value if 1 <= value <= 8 else 1


def oriented_size(img: Image.Image) -> tuple[int, int]:
    """(width, height) as displayed, i.e. after :func:`to_rgb` applies the EXIF orientation."""
    width, height = img.size
    return (height, width) if exif_orientation(img) in _SWAPS_AXES else (width, height)


def to_rgb(img: Image.Image) -> Image.Image:
    """An opened image → RGB as a viewer shows it.

    - EXIF orientation applied (a phone or camera stores the sensor's rows and a tag
      saying how to turn them; ignoring it feeds the model a sideways crop);
    - 16-bit greyscale (``I;16*``, and ``I`` as older Pillow opens 16-bit PNGs) scaled to
      8 bits by keeping the high byte: PIL's own ``convert`` clips at 255, so every pixel
      above 255/65535 of full scale would turn white;
    - every other mode through ``convert("RGB")`` (palette, greyscale, CMYK, alpha dropped).
    """
    if exif_orientation(img) != 1:
        img = ImageOps.exif_transpose(img)
    if img.mode in _SIXTEEN_BIT_MODES:
        values = np.asarray(img)
        if values.dtype != np.uint16:  # mode I is int32: keep it in the 16-bit range first
            values = np.clip(values, 0, 65535)
        img = Image.fromarray((values >> 8).astype(np.uint8))  # 2-D uint8: mode L
    return img if img.mode == "RGB" else img.convert("RGB")


def _draft_scale(stored: tuple[int, int], target: tuple[int, int]) -> int:
    """The JPEG DCT-domain scale divisor (1, 2, 4 or 8) that keeps a ``stored`` (width, height)
    image at least ``target`` (width, height): the rule of Pillow's ``JpegImageFile.draft``, so
    Pillow and simplejpeg decode the same smaller picture."""
    ratio = min(stored[0] // target[0], stored[1] // target[1])
    return next((s for s in (8, 4, 2) if ratio >= s), 1)  # 1: same size, or an upscale


def _resized(img: Image.Image, height: int, width: int) -> np.ndarray:
    """An RGB image → HxWx3 uint8 at (height, width): the one resize both decoders use, so
    simplejpeg's pixels and Pillow's stay equal."""
    if img.size != (width, height):
        img = img.resize((width, height), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def decode_pil(data: bytes, height: int, width: int, *, scaled: bool = True) -> np.ndarray | None:
    """:func:`decode` with Pillow alone: the reference, and the path for what simplejpeg
    does not take (PNG, CMYK JPEG, EXIF-rotated JPEG, or simplejpeg missing)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_IMAGE_PIXELS:
                return None
            if scaled and img.format == "JPEG":
                # the target in stored orientation: a 90° EXIF turn swaps it
                swap = exif_orientation(img) in _SWAPS_AXES
                img.draft("RGB", (height, width) if swap else (width, height))
            return _resized(to_rgb(img), height, width)
    except Exception:  # PIL raises many types for bad data; all mean "not an image"
        return None


def _decode_simplejpeg(data: bytes, height: int, width: int, scaled: bool) -> np.ndarray | None:
    """A plain RGB/greyscale JPEG through simplejpeg, else None (the caller then uses PIL)."""
    if simplejpeg is None or not data.startswith(b"\xff\xd8"):
        return None
    if data.find(b"Exif\x00\x00", 0, 1 << 16) >= 0:  # only then can an orientation tag exist
        try:
            if exif_orientation(Image.open(io.BytesIO(data))) != 1:
                return None
        except Exception:
            return None
    try:
        stored_h, stored_w, colorspace, _ = simplejpeg.decode_jpeg_header(data)
        if colorspace not in ("YCbCr", "Gray", "RGB") or stored_h * stored_w > MAX_IMAGE_PIXELS:
            return None
        s = _draft_scale((stored_w, stored_h), (width, height)) if scaled else 1
        pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-stored_h // s),
                                        min_width=-(-stored_w // s))
    except Exception:  # let PIL decide whether the bytes are an image at all
        return None
    return pixels if pixels.shape[:2] == (height, width) else _resized(Image.fromarray(pixels), height, width)


def decode(data: bytes, height: int, width: int, *, scaled: bool = True) -> np.ndarray | None:
    """Bytes → HxWx3 uint8 resized to (height, width), or None if not a decodable image.

    Pixels are :func:`to_rgb`'s: EXIF orientation applied, 16-bit greyscale scaled.
    Plain JPEGs go through simplejpeg when it is installed (libjpeg-turbo without Pillow's
    per-image overhead: 20-30% less time, the same pixels; bench/decode_backends.py).

    ``scaled``: a JPEG at least twice the target in both sides is decoded at 1/2, 1/4 or
    1/8 scale in the DCT domain (Pillow's ``draft``) before the resize: half the time or
    less for large crops. The pixels then differ from a full decode + resize by a mean of
    under 3 grey levels (tests/test_transforms.py); same-size and upscaled crops are
    unaffected. ``TransformConfig.scaled_decode`` turns it off.
    """
    pixels = _decode_simplejpeg(data, height, width, scaled)
    return pixels if pixels is not None else decode_pil(data, height, width, scaled=scaled)


def _erase_box(h: int, w: int, rng: np.random.Generator) -> tuple[int, int, int, int] | None:
    """Zhong et al. 2020 random erasing: (y, x, height, width) of the box, or None after 10 misses."""
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(0.02, 0.4)
        aspect = np.exp(rng.uniform(np.log(0.3), np.log(1 / 0.3)))
        eh, ew = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < eh < h and 0 < ew < w:
            y, x = rng.integers(0, h - eh), rng.integers(0, w - ew)
            return int(y), int(x), eh, ew
    return None


def _random_erase(img: np.ndarray, rng: np.random.Generator, mean: np.ndarray) -> None:
    """Random erasing, in place, on an HxWx3 float image in [0, 1]: the box takes ``mean``."""
    box = _erase_box(img.shape[0], img.shape[1], rng)
    if box is not None:
        y, x, eh, ew = box
        img[y : y + eh, x : x + ew] = mean


def _flip_shift(img: np.ndarray, cfg: TransformConfig, rng: np.random.Generator) -> np.ndarray:
    """Flip, then zero-pad by ``cfg.pad`` and crop back at a random offset (one copy, any dtype)."""
    if rng.random() < cfg.flip_prob:
        img = img[:, ::-1]
    if not cfg.pad:
        return img
    h, w = img.shape[:2]
    y, x = (int(v) for v in rng.integers(0, 2 * cfg.pad + 1, size=2))
    dy, dx = y - cfg.pad, x - cfg.pad  # the crop window's offset from the original
    out = np.zeros_like(img)
    out[max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)] = \
        img[max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)]
    return out


def augment(img: np.ndarray, cfg: TransformConfig, rng: np.random.Generator) -> np.ndarray:
    """Flip, pad + random crop, random erasing on HxWx3 float in [0, 1]."""
    img = np.ascontiguousarray(_flip_shift(img, cfg, rng))
    if rng.random() < cfg.random_erasing_prob:
        _random_erase(img, rng, np.asarray(cfg.mean, dtype=np.float32))
    return img


def to_tensor_layout(img: np.ndarray, cfg: TransformConfig) -> np.ndarray:
    mean = np.asarray(cfg.mean, dtype=np.float32)
    std = np.asarray(cfg.std, dtype=np.float32)
    return ((img - mean) / std).transpose(2, 0, 1).astype(np.float32, copy=False)


def _normalise_table(cfg: TransformConfig) -> np.ndarray:
    """3×256 float32: the normalised value of every uint8 level per channel, computed exactly
    as ``to_tensor_layout(pixels / 255)`` would, so the table changes speed, not values."""
    levels = np.arange(256, dtype=np.float32)[:, None] / 255.0
    return np.ascontiguousarray(to_tensor_layout(levels[:, None, :].repeat(3, axis=2), cfg)[:, :, 0])


def decode_batch(batch: dict, cfg: TransformConfig, train: bool, seed: int | None = None, *,
                 normalise: bool = True, out: np.ndarray | None = None) -> dict:
    """Ray Data batch (numpy dict with an ``image`` bytes column) → float32 N×3×H×W.

    Adds ``decode_ok`` (bool); undecodable rows keep a zero image so row order and
    counts stay intact for the consumer, which skips and counts them.

    The result equals decode → /255 → :func:`augment` → :func:`to_tensor_layout`, with
    the same random draws, but works on uint8 until one table lookup per channel writes
    the normalised CHW output (about 3× less arithmetic per image): zero padding is level
    0 either way, and an erased box (filled with ``mean``) normalises to exactly 0.

    ``normalise=False`` stops before the lookup: uint8 N×3×H×W, a quarter of the bytes to
    move between processes; :func:`normalise_batch` finishes the job where the batch is
    used. The erased box then holds the uint8 level nearest to ``mean`` (within 0.5/255 of
    what the float path gives).

    ``out``: an N×3×H×W array of the output dtype to decode into (a slice of a larger batch,
    so several row groups fill one array without a copy). Every element is written, padding
    and undecodable rows included, so it may hold anything: a decode task reuses one buffer
    without clearing it (a 50 MB clear per task was 4% of a decode process's CPU).
    """
    rng = np.random.default_rng(seed)
    raw = batch["image"]
    h, w = cfg.height, cfg.width
    dtype = np.float32 if normalise else np.uint8
    if out is None:
        out = np.empty((len(raw), 3, h, w), dtype=dtype)
    elif out.shape != (len(raw), 3, h, w) or out.dtype != dtype:
        raise ValueError(f"decode_batch: out is {out.dtype} {out.shape}, needs {np.dtype(dtype)} {(len(raw), 3, h, w)}")
    ok = np.zeros(len(raw), dtype=bool)
    table = _normalise_table(cfg)
    fill = 0.0 if normalise else np.round(np.asarray(cfg.mean) * 255).astype(np.uint8)[:, None, None]
    # pixel level 0 in the output, per channel: what a shift uncovers (_flip_shift's zero padding)
    level0 = table[:, :1, None] if normalise else 0
    for i, data in enumerate(raw):
        pixels = decode(bytes(data), h, w, scaled=cfg.scaled_decode)
        if pixels is None:
            out[i] = 0
            continue
        dy = dx = 0
        box = None
        if train:  # the draws of _flip_shift, then of augment's erasing, in their order
            if rng.random() < cfg.flip_prob:
                pixels = pixels[:, ::-1]
            if cfg.pad:
                dy, dx = (int(v) - cfg.pad for v in rng.integers(0, 2 * cfg.pad + 1, size=2))
            if rng.random() < cfg.random_erasing_prob:
                box = _erase_box(h, w, rng)
        # flip, shift and HWC → CHW in one strided copy straight into the output
        src = pixels[max(0, dy) : h - max(0, -dy), max(0, dx) : w - max(0, -dx)]
        dst = out[i, :, max(0, -dy) : h - max(0, dy), max(0, -dx) : w - max(0, dx)]
        if normalise:
            for c in range(3):
                np.take(table[c], src[:, :, c], out=dst[c], mode="clip")  # levels are 0..255: never clipped
        else:
            dst[...] = src.transpose(2, 0, 1)
        if dy or dx:  # what the shift uncovers: the strips of rows and columns dst left out
            out[i, :, : max(0, -dy)] = level0
            out[i, :, h - max(0, dy) :] = level0
            out[i, :, :, : max(0, -dx)] = level0
            out[i, :, :, w - max(0, dx) :] = level0
        if box is not None:
            y, x, eh, ew = box
            out[i, :, y : y + eh, x : x + ew] = fill
        ok[i] = True
    result = {k: v for k, v in batch.items() if k != "image"}
    result["image"] = out
    result["decode_ok"] = ok
    return result


def normalisation(cfg: TransformConfig) -> tuple[np.ndarray, np.ndarray]:
    """(scale, offset), float32 (3,) each: ``uint8 * scale + offset`` is the normalised value
    ``(level / 255 - mean) / std`` of a pixel, as one multiply and one add."""
    mean = np.asarray(cfg.mean, dtype=np.float32)
    std = np.asarray(cfg.std, dtype=np.float32)
    return (1.0 / (255.0 * std)).astype(np.float32), (-mean / std).astype(np.float32)


def normalise_batch(images: np.ndarray, cfg: TransformConfig) -> np.ndarray:
    """uint8 N×3×H×W (``decode_batch(..., normalise=False)``) → normalised float32 N×3×H×W in numpy.

    The reference for ``models.inference.model_input``, which does the same on the model's
    device; values agree with ``decode_batch``'s table lookup to within 1 float32 ulp (< 1e-6).
    """
    scale, offset = normalisation(cfg)
    out = np.multiply(images, scale[None, :, None, None], dtype=np.float32)
    out += offset[None, :, None, None]
    return out
