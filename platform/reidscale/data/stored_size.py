"""Crops stored at the training size: decode once at prepare time, not every epoch.

``prepare`` with ``store_height``/``store_width`` re-encodes each crop as the decoder would
show it (EXIF orientation applied, any mode to RGB, resized to the given size) into a JPEG
of ``store_quality``. Each epoch then decodes a crop already at the model's input size: no
resize, and for large source crops far fewer pixels to decode (bench/decode_backends.py
measures both, and the disk it costs). The shards' ``width``/``height`` keep the original
crop's size; the manifest records ``stored_size`` so training can warn when its input size
differs from what was stored.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image

from reidscale.data.transforms import decode, simplejpeg


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    """HxWx3 uint8 → JPEG bytes (4:2:0, as the public ReID datasets' files are)."""
    if simplejpeg is not None:
        return simplejpeg.encode_jpeg(np.ascontiguousarray(pixels), quality=quality, colorspace="RGB",
                                      colorsubsampling="420")
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=quality, subsampling="4:2:0")
    return buf.getvalue()


def stored_at(data: bytes, height: int, width: int, quality: int) -> bytes:
    """``data`` decoded as training decodes it, resized to height×width, re-encoded; ValueError if
    it does not decode (prepare checked it already, so that is a corrupt file caught late)."""
    pixels = decode(data, height, width)
    if pixels is None:
        raise ValueError("does not decode")
    return encode_jpeg(pixels, quality)
