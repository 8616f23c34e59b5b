"""A synthetic ReID dataset: people-like figures seen by cameras that disagree.

Each identity has its own appearance (clothing colours, a garment pattern, body shape,
an optional bag). Each camera has its own colour balance, background, viewpoint, scale,
blur and a chance of occlusion, so that the same identity looks different across
cameras and different identities can look alike inside one camera. Raw pixels are a poor
match across cameras; a trained model has to learn the invariances, which is what makes
the set useful for checking that training works.

Records come out grouped by identity, ready for :func:`reidscale.data.shards.write_dataset`.

``images="placeholder"`` is the metadata-scale mode: the same identities, cameras, splits
and long-tailed images-per-identity counts, but every image of an identity is one shared
8×4 JPEG of a few hundred bytes (one of 256 solid colours), so a million identities write
in minutes with memory that does not grow: records stream, nothing is held.
"""

from __future__ import annotations

import io
from collections import Counter
from dataclasses import dataclass
from typing import Iterator, Literal

import numpy as np
from PIL import Image, ImageFilter

from reidscale.config import ConfigError

# A small palette on purpose: many identities share a colour, so colour alone is not identity.
_PALETTE = np.array(
    [
        [200, 30, 30], [30, 60, 180], [30, 140, 60], [230, 200, 40], [240, 240, 240],
        [30, 30, 30], [120, 70, 30], [130, 40, 150], [250, 130, 30], [120, 120, 120],
        [60, 180, 200], [230, 120, 170],
    ],
    dtype=np.float32,
)
_PATTERNS = ("solid", "hstripes", "vstripes", "checker", "split")
# names of the palette entries, in order (for captions)
_COLOUR_NAMES = ("red", "blue", "green", "yellow", "white", "black", "brown", "purple", "orange", "grey", "cyan",
                 "pink")


@dataclass
class SyntheticConfig:
    """Size and difficulty of the generated set."""

    num_identities: int = 300
    # fraction of identities used for training; the rest become query + gallery
    train_fraction: float = 0.5
    num_cameras: int = 6
    # images per identity follow a clipped log-normal: long-tailed, as in real ReID sets
    images_per_identity_median: float = 12.0
    images_per_identity_sigma: float = 0.4
    min_images_per_identity: int = 4
    max_images_per_identity: int = 40
    cameras_per_identity_min: int = 2
    height: int = 128
    width: int = 64
    occlusion_prob: float = 0.3
    # query images per (test identity, camera), the Market-1501 habit
    queries_per_camera: int = 1
    max_query_cameras: int = 2
    jpeg_quality: int = 90
    seed: int = 0
    # "rendered": drawn figures (the demo); "placeholder": metadata scale, see the module doc
    images: Literal["rendered", "placeholder"] = "rendered"

    def validate(self) -> None:
        if self.num_identities < 4:
            raise ConfigError("num_identities: need at least 4")
        if not 0.0 < self.train_fraction < 1.0:
            raise ConfigError("train_fraction: must be strictly between 0 and 1")
        if self.num_cameras < 2:
            raise ConfigError("num_cameras: need at least 2 for cross-camera matching")
        if not 2 <= self.cameras_per_identity_min <= self.num_cameras:
            raise ConfigError("cameras_per_identity_min: must be in [2, num_cameras]")
        if self.min_images_per_identity < self.cameras_per_identity_min:
            raise ConfigError("min_images_per_identity: must be >= cameras_per_identity_min")
        if self.max_images_per_identity < self.min_images_per_identity:
            raise ConfigError("max_images_per_identity: must be >= min_images_per_identity")
        if self.images == "rendered" and (self.height < 32 or self.width < 16):
            raise ConfigError("height/width: at least 32x16 pixels")


@dataclass(frozen=True)
class _Identity:
    top: np.ndarray
    top2: np.ndarray
    bottom: np.ndarray
    shoes: np.ndarray
    hair: np.ndarray
    pattern: str
    period: int
    body_width: float
    leg_ratio: float
    bag: int  # 0 none, 1 left, 2 right
    bag_colour: np.ndarray


@dataclass(frozen=True)
class _Camera:
    gain: np.ndarray
    offset: float
    background: np.ndarray
    background2: np.ndarray
    shear: float
    scale: float
    blur: float
    flip: bool


def _colour(rng: np.random.Generator) -> np.ndarray:
    return np.clip(_PALETTE[rng.integers(len(_PALETTE))] + rng.normal(0, 18, 3), 0, 255)


def _make_identity(rng: np.random.Generator) -> _Identity:
    return _Identity(
        top=_colour(rng),
        top2=_colour(rng),
        bottom=_colour(rng),
        shoes=_colour(rng),
        hair=_colour(rng) * 0.5,
        pattern=_PATTERNS[rng.integers(len(_PATTERNS))],
        period=int(rng.integers(3, 9)),
        body_width=float(rng.uniform(0.45, 0.75)),
        leg_ratio=float(rng.uniform(0.38, 0.52)),
        bag=int(rng.integers(0, 3)),
        bag_colour=_colour(rng),
    )


def _make_camera(rng: np.random.Generator) -> _Camera:
    return _Camera(
        gain=rng.uniform(0.55, 1.45, 3).astype(np.float32),
        offset=float(rng.uniform(-35, 35)),
        background=rng.uniform(20, 235, 3).astype(np.float32),
        background2=rng.uniform(20, 235, 3).astype(np.float32),
        shear=float(rng.uniform(-0.25, 0.25)),
        scale=float(rng.uniform(0.7, 1.0)),
        blur=float(rng.uniform(0.0, 1.6)),
        flip=bool(rng.integers(2)),
    )


def render(ident: _Identity, cam: _Camera, rng: np.random.Generator, height: int, width: int,
           occlusion_prob: float) -> np.ndarray:
    """Render one HxWx3 uint8 view of ``ident`` through ``cam``."""
    h, w = height, width
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    # background: a camera-specific gradient plus texture noise
    t = (ys / h)[..., None]
    img = cam.background * (1 - t) + cam.background2 * t
    img = img + rng.normal(0, 12, (h, w, 1)) + rng.normal(0, 6, (h, w, 3))

    scale = cam.scale * rng.uniform(0.9, 1.05)
    fig_h = h * 0.92 * scale
    top_y = (h - fig_h) * rng.uniform(0.2, 0.8)
    cx = w / 2 + rng.normal(0, w * 0.06)
    # viewpoint: shear the figure so cameras see it leaning differently
    cx_at = cx + cam.shear * (ys - h / 2)
    half_w = w * ident.body_width * scale / 2
    head_r = fig_h * 0.09
    head_cy = top_y + head_r
    torso_top = top_y + 2 * head_r
    torso_bot = torso_top + fig_h * (1 - ident.leg_ratio) - 2 * head_r
    legs_bot = top_y + fig_h
    dx = xs - cx_at

    head = (dx**2 + (ys - head_cy) ** 2) <= head_r**2
    hair = head & (ys < head_cy - head_r * 0.2)
    torso = (np.abs(dx) <= half_w) & (ys >= torso_top) & (ys < torso_bot)
    stride = rng.uniform(0.05, 0.35) * half_w
    leg_w = half_w * 0.42
    in_legs = (ys >= torso_bot) & (ys < legs_bot)
    left = in_legs & (np.abs(dx + half_w * 0.45 + stride * (ys - torso_bot) / max(fig_h, 1)) <= leg_w)
    right = in_legs & (np.abs(dx - half_w * 0.45 - stride * (ys - torso_bot) / max(fig_h, 1)) <= leg_w)
    legs = left | right
    shoes = legs & (ys >= legs_bot - fig_h * 0.05)

    top = np.broadcast_to(ident.top, (h, w, 3)).copy()
    rel_y = ys - torso_top
    rel_x = dx + half_w
    p = ident.period * scale
    if ident.pattern == "hstripes":
        alt = (np.floor(rel_y / p) % 2) == 1
    elif ident.pattern == "vstripes":
        alt = (np.floor(rel_x / p) % 2) == 1
    elif ident.pattern == "checker":
        alt = ((np.floor(rel_y / p) + np.floor(rel_x / p)) % 2) == 1
    elif ident.pattern == "split":
        alt = dx > 0
    else:
        alt = np.zeros((h, w), dtype=bool)
    top[alt] = ident.top2

    img[torso] = top[torso]
    img[legs] = ident.bottom
    img[shoes] = ident.shoes
    img[head] = np.array([205, 170, 140], dtype=np.float32)
    img[hair] = ident.hair
    if ident.bag:
        side = -1 if ident.bag == 1 else 1
        bag = (np.abs(dx - side * half_w * 1.15) <= half_w * 0.3) & (
            np.abs(ys - (torso_top + torso_bot) / 2) <= fig_h * 0.12
        )
        img[bag] = ident.bag_colour

    # occlusion: something passes in front of the person
    if rng.random() < occlusion_prob:
        oh = int(h * rng.uniform(0.15, 0.4))
        y0 = int(rng.integers(0, h - oh))
        img[y0 : y0 + oh] = _colour(rng)

    img = img * cam.gain + cam.offset + rng.normal(0, 4, 3)
    out = np.clip(img, 0, 255).astype(np.uint8)
    if cam.flip:
        out = out[:, ::-1]
    pil = Image.fromarray(np.ascontiguousarray(out))
    radius = cam.blur + rng.uniform(0, 0.5)
    if radius > 0.3:
        pil = pil.filter(ImageFilter.GaussianBlur(radius))
    return np.asarray(pil)


def encode_jpeg(pixels: np.ndarray, quality: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def images_per_identity(cfg: SyntheticConfig, rng: np.random.Generator, n: int) -> np.ndarray:
    """Long-tailed counts: a clipped log-normal around the median."""
    counts = np.round(np.exp(rng.normal(np.log(cfg.images_per_identity_median), cfg.images_per_identity_sigma, n)))
    return np.clip(counts, cfg.min_images_per_identity, cfg.max_images_per_identity).astype(int)


def planned_images(cfg: SyntheticConfig) -> np.ndarray:
    """Images per identity (index = identity - 1) as :func:`generate` draws them, without generating.

    Exact in placeholder mode. In rendered mode an identity seen by more cameras than its
    drawn count gets one image per camera (the camera draw comes later, interleaved with
    rendering), so its real count is ``max(planned, cameras)``: a lower bound, a progress
    bar can raise its total when an identity runs over.
    """
    rng = np.random.default_rng(cfg.seed)
    if cfg.images != "placeholder":
        for _ in range(cfg.num_cameras):  # the draws _rendered_records makes before the counts
            _make_camera(rng)
    return images_per_identity(cfg, rng, cfg.num_identities)


PLACEHOLDER_WIDTH, PLACEHOLDER_HEIGHT = 4, 8


def placeholder_jpegs(n: int = 256) -> list[bytes]:
    """``n`` tiny solid-colour JPEGs (8×4): the shared images of the metadata-scale mode."""
    rng = np.random.default_rng(20240229)
    colours = rng.integers(0, 256, (n, 3), dtype=np.uint8)
    return [encode_jpeg(np.broadcast_to(c, (PLACEHOLDER_HEIGHT, PLACEHOLDER_WIDTH, 3)).copy(), 75) for c in colours]


def _split_of(is_train: bool, cam: int, cam_of: list[int], query_budget: dict[int, int]) -> str:
    """Train, or the Market-1501 habit for test identities (see :func:`generate`)."""
    if is_train:
        return "train"
    # a query needs a true match in another camera to count under the protocol
    if query_budget.get(cam, 0) > 0 and any(c != cam for c in cam_of):
        query_budget[cam] -= 1
        return "query"
    return "gallery"


def _test_splits(cam_of: list[int], query_cams: list[int], per_camera: int) -> list[str]:
    """Query/gallery for one test identity so that every query keeps a gallery match in
    another camera (the rendered mode's rule above can leave a query unmatched when an
    identity has few images; it stays as it is so the demo data does not change)."""
    splits = ["gallery"] * len(cam_of)
    gallery = Counter(cam_of)
    query_cams_used: list[int] = []
    budget = {c: per_camera for c in query_cams}
    for j, cam in enumerate(cam_of):
        if budget.get(cam, 0) <= 0:
            continue
        gallery[cam] -= 1
        left = {c for c, n in gallery.items() if n > 0}
        if all(left - {q} for q in [*query_cams_used, cam]):
            splits[j], budget[cam] = "query", budget[cam] - 1
            query_cams_used.append(cam)
        else:
            gallery[cam] += 1
    return splits


def _placeholder_records(cfg: SyntheticConfig, chunk: int = 4096) -> Iterator[dict]:
    """The metadata-scale stream: random draws in numpy per chunk of identities, rows in plain Python."""
    rng = np.random.default_rng(cfg.seed)
    images = placeholder_jpegs()
    n_train = max(2, int(round(cfg.num_identities * cfg.train_fraction)))
    counts = images_per_identity(cfg, rng, cfg.num_identities)
    for start in range(0, cfg.num_identities, chunk):
        m = min(chunk, cfg.num_identities - start)
        n_cams = rng.integers(cfg.cameras_per_identity_min, cfg.num_cameras + 1, size=m).tolist()
        perms = np.argsort(rng.random((m, cfg.num_cameras)), axis=1).tolist()
        fills = rng.integers(0, 1 << 30, size=(m, cfg.max_images_per_identity)).tolist()
        colours = rng.integers(len(images), size=m).tolist()
        for i in range(m):
            index = start + i
            identity, n_images = index + 1, int(counts[index])
            # unlike the rendered mode, the drawn count wins over the drawn number of cameras,
            # so the images-per-identity distribution is exactly the long-tailed one
            k = min(n_cams[i], n_images)
            cams = perms[i][:k]
            # every chosen camera sees the identity at least once
            cam_of = cams + [cams[f % k] for f in fills[i][: max(0, n_images - k)]]
            is_train = index < n_train
            splits = (["train"] * len(cam_of) if is_train
                      else _test_splits(cam_of, cams[: cfg.max_query_cameras], cfg.queries_per_camera))
            image = images[colours[i]]
            for j, cam in enumerate(cam_of):
                yield {
                    "image": image,
                    "identity": identity,
                    "camera": cam,
                    "split": splits[j],
                    "label": index if is_train else -1,
                    "path": f"synthetic/{identity:07d}_c{cam}_{j:04d}.jpg",
                    "width": PLACEHOLDER_WIDTH,
                    "height": PLACEHOLDER_HEIGHT,
                }


def generate(cfg: SyntheticConfig) -> Iterator[dict]:
    """Yield one record per image, identity after identity.

    Identities ``1..n_train`` are the train split (``label`` = identity - 1); the rest are
    split per Market-1501 habit into query (``queries_per_camera`` image(s) per camera,
    for up to ``max_query_cameras`` cameras) and gallery (all other images).
    Record keys: image (JPEG bytes), identity, camera, split, label, path, width, height.
    """
    if cfg.images == "placeholder":
        yield from _placeholder_records(cfg)
        return
    for record, _ in _rendered_records(cfg):
        yield record


def colour_name(rgb: np.ndarray) -> str:
    """The palette name nearest to an RGB colour."""
    return _COLOUR_NAMES[int(np.argmin(((_PALETTE - np.asarray(rgb, np.float32)) ** 2).sum(1)))]


def caption(ident: _Identity) -> str:
    """A sentence naming an identity's attributes, e.g. "a person with black hair in a red and
    white striped top, blue trousers and grey shoes, carrying a green bag" (for image-text
    pre-training; the camera's colour balance is not in it)."""
    top, top2 = colour_name(ident.top), colour_name(ident.top2)
    garment = {"solid": f"a {top} top", "hstripes": f"a {top} and {top2} striped top",
               "vstripes": f"a {top} and {top2} vertically striped top", "checker": f"a {top} and {top2} checked top",
               "split": f"a {top} and {top2} half and half top"}[ident.pattern]
    build = "slim" if ident.body_width < 0.55 else "broad" if ident.body_width > 0.65 else "medium"
    bag = f", carrying a {colour_name(ident.bag_colour)} bag" if ident.bag else ", no bag"
    return (f"a {build} person with {colour_name(ident.hair * 2)} hair in {garment}, "
            f"{colour_name(ident.bottom)} trousers and {colour_name(ident.shoes)} shoes{bag}")


def generate_captioned(cfg: SyntheticConfig) -> Iterator[tuple[dict, str]]:
    """:func:`generate`'s rendered records (same seed, same records), each with its identity's
    :func:`caption`."""
    for record, ident in _rendered_records(cfg):
        yield record, caption(ident)


def _rendered_records(cfg: SyntheticConfig) -> Iterator[tuple[dict, _Identity]]:
    rng = np.random.default_rng(cfg.seed)
    cameras = [_make_camera(rng) for _ in range(cfg.num_cameras)]
    n_train = max(2, int(round(cfg.num_identities * cfg.train_fraction)))
    counts = images_per_identity(cfg, rng, cfg.num_identities)
    for index in range(cfg.num_identities):
        identity = index + 1
        ident = _make_identity(rng)
        n_cams = int(rng.integers(cfg.cameras_per_identity_min, cfg.num_cameras + 1))
        cams = rng.choice(cfg.num_cameras, size=n_cams, replace=False)
        n_images = int(counts[index])
        # every chosen camera sees the identity at least once
        cam_of = np.concatenate([cams, rng.choice(cams, size=max(0, n_images - n_cams))])
        is_train = index < n_train
        query_budget = {int(c): cfg.queries_per_camera for c in cams[: cfg.max_query_cameras]}
        cam_list = cam_of.tolist()
        for j, cam in enumerate(cam_list):
            pixels = render(ident, cameras[cam], rng, cfg.height, cfg.width, cfg.occlusion_prob)
            yield {
                "image": encode_jpeg(pixels, cfg.jpeg_quality),
                "identity": identity,
                "camera": cam,
                "split": _split_of(is_train, cam, cam_list, query_budget),
                "label": index if is_train else -1,
                "path": f"synthetic/{identity:07d}_c{cam}_{j:04d}.jpg",
                "width": cfg.width,
                "height": cfg.height,
            }, ident
