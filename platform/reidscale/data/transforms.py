"""Decode and augment image bytes into normalised CHW float32 arrays (numpy only).

These run inside Ray Data ``map_batches`` on CPU workers, so they avoid torch and keep
every step vectorisable per image. A row whose bytes do not decode is not dropped
silently: its ``decode_ok`` flag is False and the consumer counts it.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass

import numpy as np
from PIL import Image

from reidscale.config import ConfigError

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


def decode(data: bytes, height: int, width: int) -> np.ndarray | None:
    """Bytes → HxWx3 uint8 resized to (height, width), or None if not a decodable image."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            if img.width * img.height > MAX_IMAGE_PIXELS:
                return None
            img = img.convert("RGB")
            img = img.resize((width, height), Image.BILINEAR)
            return np.asarray(img, dtype=np.uint8)
    except Exception:  # PIL raises many types for bad data; all mean "not an image"
        return None


def _random_erase(img: np.ndarray, rng: np.random.Generator, mean: np.ndarray) -> None:
    """Zhong et al. 2020 random erasing, in place, on an HxWx3 float image in [0, 1]."""
    h, w = img.shape[:2]
    area = h * w
    for _ in range(10):
        target = area * rng.uniform(0.02, 0.4)
        aspect = np.exp(rng.uniform(np.log(0.3), np.log(1 / 0.3)))
        eh, ew = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < eh < h and 0 < ew < w:
            y, x = rng.integers(0, h - eh), rng.integers(0, w - ew)
            img[y : y + eh, x : x + ew] = mean
            return


def augment(img: np.ndarray, cfg: TransformConfig, rng: np.random.Generator) -> np.ndarray:
    """Flip, pad + random crop, random erasing on HxWx3 float in [0, 1]."""
    if rng.random() < cfg.flip_prob:
        img = img[:, ::-1]
    if cfg.pad:
        h, w = img.shape[:2]
        padded = np.pad(img, ((cfg.pad, cfg.pad), (cfg.pad, cfg.pad), (0, 0)))
        y, x = rng.integers(0, 2 * cfg.pad + 1, size=2)
        img = padded[y : y + h, x : x + w]
    img = np.ascontiguousarray(img)
    if rng.random() < cfg.random_erasing_prob:
        _random_erase(img, rng, np.asarray(cfg.mean, dtype=np.float32))
    return img


def to_tensor_layout(img: np.ndarray, cfg: TransformConfig) -> np.ndarray:
    mean = np.asarray(cfg.mean, dtype=np.float32)
    std = np.asarray(cfg.std, dtype=np.float32)
    return ((img - mean) / std).transpose(2, 0, 1).astype(np.float32, copy=False)


def decode_batch(batch: dict, cfg: TransformConfig, train: bool, seed: int | None = None) -> dict:
    """Ray Data batch (numpy dict with an ``image`` bytes column) → float32 N×3×H×W.

    Adds ``decode_ok`` (bool); undecodable rows keep a zero image so row order and
    counts stay intact for the consumer, which skips and counts them.
    """
    rng = np.random.default_rng(seed)
    raw = batch["image"]
    out = np.zeros((len(raw), 3, cfg.height, cfg.width), dtype=np.float32)
    ok = np.zeros(len(raw), dtype=bool)
    for i, data in enumerate(raw):
        pixels = decode(bytes(data), cfg.height, cfg.width)
        if pixels is None:
            continue
        img = pixels.astype(np.float32) / 255.0
        if train:
            img = augment(img, cfg, rng)
        out[i] = to_tensor_layout(img, cfg)
        ok[i] = True
    result = {k: v for k, v in batch.items() if k != "image"}
    result["image"] = out
    result["decode_ok"] = ok
    return result
