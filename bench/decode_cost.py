"""What upright, 16-bit-aware decoding costs: ``transforms.decode`` against the plain PIL decode
a torchreid user runs (``Image.open(f).convert("RGB")``, then resize), per image.

    python bench/decode_cost.py [--images 600] [--rounds 7]

Inputs: the demo's synthetic 128×64 JPEGs (no EXIF, the common case), the same JPEGs with an
EXIF orientation-6 tag (ours rotates them, the peer does not), and 16-bit greyscale PNGs
(ours scales them, the peer turns them white). Both decoders resize to 256×128. Rounds
time the two decoders image by image in alternating order and the median round is reported,
so a load spike from other processes hits both alike. Writes bench/results/decode_cost.json.
"""

from __future__ import annotations

import argparse
import io
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import print_table, write_results  # noqa: E402


def plain_pil(data: bytes, height: int, width: int) -> np.ndarray:
    from PIL import Image

    img = Image.open(io.BytesIO(data)).convert("RGB")
    return np.asarray(img.resize((width, height), Image.BILINEAR), dtype=np.uint8)


def inputs(n: int) -> dict[str, list[bytes]]:
    from PIL import Image

    from reidscale.data.sources.synthetic import SyntheticConfig, generate

    jpegs = [r["image"] for r, _ in zip(generate(SyntheticConfig(num_identities=max(8, n // 8))), range(n))]
    exif = Image.Exif()
    exif[0x0112] = 6
    tagged = []
    for data in jpegs:
        buf = io.BytesIO()
        Image.open(io.BytesIO(data)).save(buf, "JPEG", quality=90, exif=exif.tobytes())
        tagged.append(buf.getvalue())
    rng = np.random.default_rng(0)
    pngs = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 65536, (128, 64), dtype=np.uint16)).save(buf, "PNG")
        pngs.append(buf.getvalue())
    return {"JPEG 128×64": jpegs, "JPEG 128×64, EXIF orientation 6": tagged, "16-bit grey PNG 128×64": pngs}


def paired_us(ours, peer, images: list[bytes]) -> tuple[float, float]:
    """Mean µs per image of each decoder, timed image by image in alternating order, so load
    from other processes falls on both alike."""
    totals = [0, 0]
    for i, data in enumerate(images):
        order = ((0, ours), (1, peer)) if i % 2 else ((1, peer), (0, ours))
        for slot, fn in order:
            start = time.perf_counter_ns()
            fn(data, 256, 128)
            totals[slot] += time.perf_counter_ns() - start
    return totals[0] / len(images) / 1e3, totals[1] / len(images) / 1e3


def main() -> None:
    from reidscale.data.transforms import decode

    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=600)
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    rows = []
    for name, images in inputs(args.images).items():
        ours, peer = [], []
        for _ in range(args.rounds):
            o, p = paired_us(decode, plain_pil, images)
            ours.append(o)
            peer.append(p)
        o, p = statistics.median(ours), statistics.median(peer)
        rows.append({"input": name, "plain PIL µs/img": f"{p:.0f}", "ours µs/img": f"{o:.0f}",
                     "ours / plain PIL": f"{o / p:.2f}", "_ours_us": o, "_peer_us": p})
    print_table(rows, ["input", "plain PIL µs/img", "ours µs/img", "ours / plain PIL"])
    path = write_results("decode_cost", {"images": args.images, "rounds": args.rounds,
                                         "rows": [{k.lstrip("_"): v for k, v in r.items()} for r in rows]})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
