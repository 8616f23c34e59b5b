"""JPEG decoders for training crops, and what storing crops at the training size saves.

Part 1, decoders: µs per image to turn JPEG bytes into the HxWx3 uint8 the augmentation
takes, for person crops (256×128), vehicle crops (256×256), a Market-1501-sized crop
upscaled (128×64 → 256×128) and larger source crops downscaled (512×256, 1024×512 →
256×128). Candidates: Pillow (open, convert, resize), Pillow with ``draft()`` (1/2..1/8
DCT-domain scaling before the resize), simplejpeg (full and scaled decode), PyTurboJPEG
(full and scaled; only where its library loads), pillow-simd (only with
``--pillow-simd-python``: an interpreter whose environment has pillow-simd instead of
Pillow, since the two cannot share one), and ours (``transforms.decode``: simplejpeg with
Pillow as fallback, scaled decode on). Each row also gives the largest and the mean
difference from Pillow's full decode + resize, in grey levels.

Part 2, stored size: bytes per crop on disk as the source files are vs re-encoded at the
training size (``prepare``'s ``store_height``/``store_width``, quality 95), and the time of
one training decode + augmentation (``decode_batch``) per image for each.

Inputs are photo-like synthetic crops (smooth shading, sensor noise, hard edges; JPEG at
quality 90), not flat colour, so decoders and filters are exercised as on camera crops.
Timings are interleaved image by image across candidates, the median of ``--rounds``.

    python bench/decode_backends.py [--images 200] [--rounds 5] [--pillow-simd-python PATH]
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from _common import print_table, write_results  # noqa: E402

CASES = {  # name: (stored height, width), (target height, width)
    "person 256×128": ((256, 128), (256, 128)),
    "vehicle 256×256": ((256, 256), (256, 256)),
    "Market-size 128×64 → 256×128": ((128, 64), (256, 128)),
    "large 512×256 → 256×128": ((512, 256), (256, 128)),
    "large 1024×512 → 256×128": ((1024, 512), (256, 128)),
}


def photo_like(h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    phase = rng.uniform(0, 6.3, 3)
    img = np.stack([128 + 60 * np.sin(x / (0.04 * w + c) + y / (0.05 * h + 2 * c) + phase[c]) for c in range(3)], -1)
    img += rng.normal(0, 12, img.shape)
    y0, x0 = rng.integers(0, h // 2), rng.integers(0, w // 2)
    img[y0 : y0 + h // 4, x0 : x0 + w // 3] = rng.integers(0, 256, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def jpegs(shape: tuple[int, int], n: int, seed: int = 0) -> list[bytes]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(photo_like(*shape, rng)).save(buf, "JPEG", quality=90)
        out.append(buf.getvalue())
    return out


# --- the candidates: bytes, (height, width) -> HxWx3 uint8 ----------------------------------

def _resize(pixels: np.ndarray, h: int, w: int) -> np.ndarray:
    if pixels.shape[:2] == (h, w):
        return pixels
    return np.asarray(Image.fromarray(pixels).resize((w, h), Image.BILINEAR))


def pil(data: bytes, h: int, w: int) -> np.ndarray:
    img = Image.open(io.BytesIO(data)).convert("RGB")
    return np.asarray(img if img.size == (w, h) else img.resize((w, h), Image.BILINEAR))


def pil_draft(data: bytes, h: int, w: int) -> np.ndarray:
    img = Image.open(io.BytesIO(data))
    img.draft("RGB", (w, h))
    img = img.convert("RGB")
    return np.asarray(img if img.size == (w, h) else img.resize((w, h), Image.BILINEAR))


def candidates() -> tuple[dict, dict]:
    """(name -> decoder, name -> why it is missing)."""
    from reidscale.data.transforms import _draft_scale, decode

    found, missing = {"Pillow": pil, "Pillow + draft()": pil_draft}, {}
    try:
        import simplejpeg

        def sj(data, h, w):
            return _resize(simplejpeg.decode_jpeg(data, colorspace="RGB"), h, w)

        def sj_scaled(data, h, w):
            sh, sw, _, _ = simplejpeg.decode_jpeg_header(data)
            s = _draft_scale((sw, sh), (w, h))
            return _resize(simplejpeg.decode_jpeg(data, colorspace="RGB", min_height=-(-sh // s),
                                                  min_width=-(-sw // s)), h, w)

        found["simplejpeg"], found["simplejpeg, scaled"] = sj, sj_scaled
    except ImportError as exc:
        missing["simplejpeg"] = str(exc)
    try:
        import turbojpeg

        tj = turbojpeg.TurboJPEG()

        def tj_full(data, h, w):
            return _resize(tj.decode(data, pixel_format=turbojpeg.TJPF_RGB), h, w)

        def tj_scaled(data, h, w):
            sw, sh, _, _ = tj.decode_header(data)
            s = _draft_scale((sw, sh), (w, h))
            return _resize(tj.decode(data, pixel_format=turbojpeg.TJPF_RGB, scaling_factor=(1, s)), h, w)

        found["PyTurboJPEG"], found["PyTurboJPEG, scaled"] = tj_full, tj_scaled
    except Exception as exc:  # ImportError, or its shared library missing or too old
        missing["PyTurboJPEG"] = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
    found["ours (transforms.decode)"] = decode
    return found, missing


def interleaved_us(decoders: dict, images: list[bytes], h: int, w: int, rounds: int) -> dict[str, float]:
    """Median over rounds of the mean µs per image, decoders taking turns image by image."""
    names = list(decoders)
    per_round = {n: [] for n in names}
    for r in range(rounds):
        totals = dict.fromkeys(names, 0)
        for i, data in enumerate(images):
            turn = names[(i + r) % len(names):] + names[:(i + r) % len(names)]
            for name in turn:
                start = time.perf_counter_ns()
                decoders[name](data, h, w)
                totals[name] += time.perf_counter_ns() - start
        for n in names:
            per_round[n].append(totals[n] / len(images) / 1e3)
    return {n: statistics.median(v) for n, v in per_round.items()}


PILLOW_SIMD_SNIPPET = r"""
import io, json, statistics, sys, time
import numpy as np
from PIL import Image
cases = json.load(open(sys.argv[1]))
out = {"pillow": Image.__version__}
for name, case in cases.items():
    h, w = case["target"]
    images = [bytes.fromhex(x) for x in case["images"]]
    rounds = []
    for _ in range(case["rounds"]):
        t = time.perf_counter_ns()
        for d in images:
            img = Image.open(io.BytesIO(d)).convert("RGB")
            np.asarray(img if img.size == (w, h) else img.resize((w, h), Image.BILINEAR))
        rounds.append((time.perf_counter_ns() - t) / len(images) / 1e3)
    out[name] = statistics.median(rounds)
print(json.dumps(out))
"""


def pillow_simd(python: str, inputs: dict, rounds: int) -> dict:
    """µs per image of Pillow's decode + resize under another interpreter (pillow-simd)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec = Path(tmp) / "cases.json"
        spec.write_text(json.dumps({name: {"target": CASES[name][1], "images": [d.hex() for d in images],
                                           "rounds": rounds} for name, images in inputs.items()}))
        done = subprocess.run([python, "-c", PILLOW_SIMD_SNIPPET, str(spec)], capture_output=True, text=True,
                              check=True)
    return json.loads(done.stdout)


def stored_size_rows(n: int) -> list[dict]:
    """Disk bytes and one epoch's decode + augmentation per image, as stored vs at the training size."""
    from reidscale.data.stored_size import stored_at
    from reidscale.data.transforms import TransformConfig, decode_batch

    cfg = TransformConfig(height=256, width=128)
    rows = []
    for name in ("Market-size 128×64 → 256×128", "large 512×256 → 256×128", "large 1024×512 → 256×128"):
        source = jpegs(CASES[name][0], n, seed=7)
        stored = [stored_at(d, 256, 128, 95) for d in source]
        timings = {}
        for label, images in (("as the files", source), ("at 256×128", stored)):
            batch = {"image": np.array(images, dtype=object)}
            decode_batch(batch, cfg, train=True, seed=0, normalise=False)  # warm
            best = []
            for r in range(3):
                t = time.perf_counter()
                decode_batch(batch, cfg, train=True, seed=r, normalise=False)
                best.append((time.perf_counter() - t) / n * 1e6)
            timings[label] = statistics.median(best)
        src_b, st_b = np.mean([len(d) for d in source]), np.mean([len(d) for d in stored])
        rows.append({"source crops": name, "bytes/crop as files": f"{src_b:,.0f}",
                     "bytes/crop stored 256×128 q95": f"{st_b:,.0f}", "disk ratio": f"{st_b / src_b:.2f}",
                     "epoch µs/img as files": f"{timings['as the files']:.0f}",
                     "epoch µs/img stored": f"{timings['at 256×128']:.0f}",
                     "epoch speed-up": f"{timings['as the files'] / timings['at 256×128']:.2f}",
                     "_raw": {"source_bytes": src_b, "stored_bytes": st_b, **{f"us_{k}": v for k, v in timings.items()}}})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=200, help="images per case")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--pillow-simd-python", default="", help="an interpreter with pillow-simd installed")
    args = parser.parse_args()

    decoders, missing = candidates()
    inputs = {name: jpegs(stored, args.images) for name, (stored, _) in CASES.items()}
    simd = pillow_simd(args.pillow_simd_python, inputs, args.rounds) if args.pillow_simd_python else {}
    if not args.pillow_simd_python:
        missing["pillow-simd"] = "no --pillow-simd-python given"
    rows, raw = [], {}
    for name, images in inputs.items():
        h, w = CASES[name][1]
        us = interleaved_us(decoders, images, h, w, args.rounds)
        if simd:
            us[f"pillow-simd {simd['pillow']}"] = simd[name]
        reference = [pil(d, h, w).astype(np.int16) for d in images[:20]]
        raw[name] = {}
        for dec, t in us.items():
            diff = ([np.abs(decoders[dec](d, h, w).astype(np.int16) - ref) for d, ref in zip(images, reference)]
                    if dec in decoders else [np.zeros(1)])
            raw[name][dec] = {"us": t, "max_diff": int(max(d.max() for d in diff)),
                              "mean_diff": float(np.mean([d.mean() for d in diff]))}
            rows.append({"crops": name, "decoder": dec, "µs/img": f"{t:.0f}", "vs Pillow": f"{us['Pillow'] / t:.2f}×",
                         "max |Δ| vs Pillow": raw[name][dec]["max_diff"] if dec in decoders else "n/a",
                         "mean |Δ|": f"{raw[name][dec]['mean_diff']:.2f}" if dec in decoders else "n/a"})
    print_table(rows)
    for name, why in missing.items():
        print(f"not measured: {name}: {why}")
    stored = stored_size_rows(max(50, args.images // 2))
    print_table([{k: v for k, v in r.items() if not k.startswith("_")} for r in stored])
    path = write_results("decode_backends", {"images": args.images, "rounds": args.rounds, "decoders": raw,
                                             "missing": missing,
                                             "stored_size": [{"case": r["source crops"], **r["_raw"]} for r in stored]})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
