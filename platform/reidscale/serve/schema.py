"""HTTP request/response bodies and the checks on them (plain functions: no Ray, no FastAPI).

Images travel as base64 strings in JSON so one body can carry many images with their
cameras, and every check below can name the item it refuses (``images[3]: ...``).
"""

from __future__ import annotations

import base64
import binascii
from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, Field


# Row ids and identities are int64 columns, cameras int32: a larger JSON integer must be refused
# here (422 naming the field), not reach numpy as an OverflowError (a 500).
Int64 = Annotated[int, Field(ge=-(2**63), le=2**63 - 1)]
Camera = Annotated[int, Field(ge=-(2**31), le=2**31 - 1)]


class InputError(ValueError):
    """A request the service refuses; ``status`` is the HTTP code (413 too large, 422 invalid)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


class SearchRequest(BaseModel):
    images: list[str] | None = Field(None, description="base64-encoded image files (JPEG/PNG/...)")
    vectors: list[list[float]] | None = Field(None, description="query embeddings, each of the gallery's dim")
    k: int = Field(10, description="distinct identities per query")
    query_cameras: list[Camera] | None = Field(None, description="camera id of each query image (SIE models need it)")
    cameras: list[Camera] | None = Field(None, description="only match gallery images from these cameras")
    exclude_camera: Camera | None = Field(None, description="never match gallery images from this camera")


class Match(BaseModel):
    identity: int
    score: float = Field(description="inner product (metric ip, higher is closer) or squared L2 (l2, lower is closer)")
    row_id: int = Field(description="the identity's best-matching gallery image")
    camera: int
    path: str


class QueryResult(BaseModel):
    matches: list[Match]
    is_new: bool | None = Field(description="no identity passes the open-set threshold; null without a threshold")


class SearchResponse(BaseModel):
    generation: int
    metric: str
    score_threshold: float | None
    results: list[QueryResult]


class EnrolRequest(BaseModel):
    images: list[str] | None = Field(None, description="base64-encoded image files")
    vectors: list[list[float]] | None = None
    identity: Int64 | Literal["new"] = Field(description='an identity id, or "new": the service assigns an unused one')
    cameras: list[Camera] | None = Field(None, description="camera id of each item (stored; SIE models need it)")
    paths: list[str] | None = Field(None, description="a label per item, stored as its path")


class EnrolResponse(BaseModel):
    identity: int
    row_ids: list[int]
    generation: int


class DeleteRowsRequest(BaseModel):
    row_ids: list[Int64]


class DeleteResponse(BaseModel):
    removed: int
    generation: int


def one_source(images: list | None, vectors: list | None, max_items: int) -> int:
    """Number of items; exactly one of images/vectors, non-empty, at most ``max_items``."""
    if (images is None) == (vectors is None):
        raise InputError("give exactly one of images or vectors")
    n = len(images if images is not None else vectors)
    if n == 0:
        raise InputError(f"{'images' if images is not None else 'vectors'}: empty")
    if n > max_items:
        raise InputError(f"{n} items in one request; the limit is max_items={max_items}", status=413)
    return n


def decode_images(items: list[str], max_bytes: int) -> list[bytes]:
    """base64 strings → bytes; refuses invalid base64 and images over ``max_bytes`` (413)."""
    out = []
    for i, text in enumerate(items):
        if len(text) > (max_bytes * 4) // 3 + 4:  # refuse before decoding what is already too big
            raise InputError(f"images[{i}]: over the {max_bytes} byte limit (max_image_mb)", status=413)
        try:
            data = base64.b64decode(text, validate=True)
        except (binascii.Error, ValueError):
            raise InputError(f"images[{i}]: not valid base64") from None
        if len(data) > max_bytes:
            raise InputError(f"images[{i}]: {len(data)} bytes, over the {max_bytes} byte limit (max_image_mb)",
                             status=413)
        if not data:
            raise InputError(f"images[{i}]: empty")
        out.append(data)
    return out


def check_vectors(rows: list[list[float]], dim: int, metric: str) -> np.ndarray:
    """N×dim float32; refuses a wrong length, non-finite values and (ip) vectors not of unit norm.

    An ip gallery holds L2-normalised embeddings: a query or enrolment of another norm
    would get scores on another scale than the open-set threshold was chosen on.
    """
    for i, row in enumerate(rows):
        if len(row) != dim:
            raise InputError(f"vectors[{i}]: {len(row)} values, the gallery's vectors have {dim}")
    x = np.asarray(rows, dtype=np.float64).reshape(len(rows), dim)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise InputError(f"vectors[{int(np.flatnonzero(bad)[0])}]: holds NaN or infinity")
    x = x.astype(np.float32)
    if metric == "ip":
        norms = np.linalg.norm(x, axis=1)
        off = np.abs(norms - 1.0) > 1e-3
        if off.any():
            i = int(np.flatnonzero(off)[0])
            raise InputError(f"vectors[{i}]: norm {norms[i]:.4g}; this inner-product gallery holds L2-normalised "
                             "vectors, normalise it first")
    return x


def check_cameras(cameras: list[int] | None, n: int, field: str) -> list[int] | None:
    if cameras is not None and len(cameras) != n:
        raise InputError(f"{field}: {len(cameras)} camera ids for {n} items; give one per item")
    return cameras


def check_sie_cameras(cameras: list[int] | None, sie_cameras: int, field: str) -> None:
    """A model with camera SIE needs each image's camera, inside the range it was trained on."""
    if not sie_cameras:
        return
    if cameras is None:
        raise InputError(f"{field}: the model uses camera SIE ({sie_cameras} cameras); give each image's camera id")
    for i, c in enumerate(cameras):
        if not 0 <= c < sie_cameras:
            raise InputError(f"{field}[{i}]: camera {c} outside [0, {sie_cameras}) of the SIE model")


def check_k(k: int, max_k: int) -> int:
    if k < 1:
        raise InputError(f"k: {k}; must be >= 1")
    if k > max_k:
        raise InputError(f"k: {k}; the limit is max_k={max_k}")
    return k
