"""Gallery embedding: ``jobs/build_index.py``'s Ray Data path vs a plain PyTorch loop.

The same exported model and the same images, one after the other, each in a fresh process:

- ours: ``embed.embed_split`` exactly as ``build_index`` calls it (Parquet shards → Ray Data
  decode tasks → an actor pool of ``Embedder``s → embedding shards on disk), local Ray with
  2 CPUs, ``EmbedConfig`` as the job would take it (``--actors``, ``--cpus-per-actor``);
- plain: ``torch.utils.data.DataLoader`` over a folder of the same JPEG files (each item
  decoded and normalised by the same ``transforms.decode_batch``, ``--loader-workers``
  worker processes) feeding ``model.eval()`` under ``torch.inference_mode`` in the main
  process, vectors kept in memory.

Reported apart: the start-up (from the call to the first embedded batch: ``ray.init``, actor
start and model load, or DataLoader worker start and model load) and the rate once started
(images after the first batch over the time after it). Peak memory is the summed PSS of the
run's whole process tree, sampled from outside it. Both must give the same vectors (checked).

    python bench/embed_throughput.py [--images 20000] [--height 256 --width 128] [--rounds 2]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from _common import print_table, run_process_tree, wait_until_quiet, write_results  # noqa: E402

SPLIT = "train"


def build_data(work: Path, images: int, height: int, width: int) -> tuple[Path, Path]:
    """(shard dir, JPEG folder) of ``images`` synthetic crops at height×width; reused when present."""
    from reidscale.data.shards import write_dataset
    from reidscale.data.sources.synthetic import SyntheticConfig, generate

    shards, folder = work / f"shards_{images}_{height}x{width}", work / f"jpeg_{images}_{height}x{width}"
    if (shards / "manifest.json").is_file() and (folder / "_done").is_file():
        return shards, folder
    identities = max(10, images // 12)
    cfg = SyntheticConfig(num_identities=identities + 5, train_fraction=identities / (identities + 5),
                          height=height, width=width, seed=0)
    folder.mkdir(parents=True, exist_ok=True)

    def records():
        count = 0
        for rec in generate(cfg):
            if rec["split"] != SPLIT:
                continue
            # the bytes the shards hold, named in the order write_dataset numbers its row ids
            (folder / f"{count:08d}.jpg").write_bytes(rec["image"])
            yield rec
            count += 1
            if count == images:
                return

    write_dataset(records(), shards, source="synthetic", rows_per_group=256, groups_per_shard=8)
    (folder / "_done").write_text("ok\n")
    return shards, folder


def export_model(work: Path, height: int, width: int) -> Path:
    """The demo's tiny ViT at the benchmark's input size, random weights, exported as training would."""
    import torch

    from reidscale.config import load_config
    from reidscale.models.reid import build_reid_model, export_embedding_model
    from reidscale.train.config import TrainJobConfig

    out = work / f"model_{height}x{width}"
    if (out / "config.json").is_file():
        return out
    cfg = load_config(TrainJobConfig, Path(__file__).resolve().parents[1] / "configs" / "demo" / "train.yaml",
                      [f"transform.height={height}", f"transform.width={width}", "model.patch_size=16"])
    torch.manual_seed(0)
    model = build_reid_model(cfg.model, cfg.transform, 100)
    return export_embedding_model(model.embedding, cfg.model, cfg.transform, out)


def _rates(stamps: list[tuple[float, int]], t_call: float) -> dict:
    """stamps: (time, images so far) after each batch; t_call: when the run was asked for."""
    (t_first, n_first), (t_last, n_last) = stamps[0], stamps[-1]
    # the second half alone: blocks decoded ahead during the start-up (ours: Ray Data's decode
    # tasks run while the actor loads its model) are spent by then, so this is the steady state
    t_half, n_half = next((t, n) for t, n in stamps if n >= n_last / 2)
    return {"startup_s": t_first - t_call, "images": n_last,
            "images_per_s": (n_last - n_first) / max(t_last - t_first, 1e-9),
            "second_half_images_per_s": (n_last - n_half) / max(t_last - t_half, 1e-9),
            "images_at_first_batch": n_first, "wall_s": t_last - t_call}


def run_ours(model_dir: str, shards: str, out_dir: str, actors: int, cpus_per_actor: float, batch: int) -> dict:
    from reidscale.embed import EmbedConfig, embed_split, read_embeddings

    t_call = time.perf_counter()
    stamps: list[tuple[float, int]] = []
    stats = embed_split(model_dir, shards, SPLIT, out_dir,
                        EmbedConfig(batch_size=batch, num_actors=actors, cpus_per_actor=cpus_per_actor),
                        on_batch=lambda done: stamps.append((time.perf_counter(), done)))
    vectors, table = read_embeddings(out_dir)
    order = np.argsort(table.column("row_id").to_numpy())
    return {**_rates(stamps, t_call), "decode_errors": stats["decode_errors"], "vectors": vectors[order][:256]}


def run_plain(model_dir: str, folder: str, workers: int, batch: int) -> dict:
    import torch
    from torch.utils.data import DataLoader, Dataset

    from reidscale.data.transforms import decode_batch
    from reidscale.models.reid import load_embedding_model

    t_call = time.perf_counter()
    model, config = load_embedding_model(model_dir)
    transform = config["transform_config"]

    class Folder(Dataset):
        def __init__(self):
            self.files = sorted(Path(folder).glob("*.jpg"))

        def __len__(self):
            return len(self.files)

        def __getitem__(self, i):
            out = decode_batch({"image": np.array([self.files[i].read_bytes()], dtype=object)}, transform, train=False)
            return torch.from_numpy(out["image"][0])

    loader = DataLoader(Folder(), batch_size=batch, num_workers=workers, multiprocessing_context="fork")
    stamps, done, vectors = [], 0, []
    with torch.inference_mode():
        for images in loader:
            vectors.append(model(images).numpy())
            done += len(images)
            stamps.append((time.perf_counter(), done))
    return {**_rates(stamps, t_call), "torch_threads": torch.get_num_threads(),
            "vectors": np.concatenate(vectors)[:256]}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--height", type=int, default=256)
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--actors", type=int, default=1)
    parser.add_argument("--cpus-per-actor", type=float, default=1.0)
    parser.add_argument("--loader-workers", type=int, nargs="+", default=[1, 2],
                        help="the plain loop's DataLoader worker counts to try; the fastest is the peer")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the median is reported")
    parser.add_argument("--work-dir", default="/tmp/reidscale_bench_embed")
    args = parser.parse_args()

    import tempfile

    work = Path(args.work_dir)
    t0 = time.perf_counter()
    shards, folder = build_data(work, args.images, args.height, args.width)
    model_dir = export_model(work, args.height, args.width)
    print(f"data: {args.images} images at {args.height}x{args.width} ({time.perf_counter() - t0:.0f} s to build "
          f"or find); model {model_dir}", flush=True)

    setups = {f"plain, DataLoader {w} worker(s)": (run_plain, (str(model_dir), str(folder), w, args.batch))
              for w in args.loader_workers}
    ours_name = f"ours: embed_split, {args.actors} actor(s) × {args.cpus_per_actor:g} CPU"
    runs: dict[str, list[dict]] = {name: [] for name in [*setups, ours_name]}
    for r in range(args.rounds):
        order = list(runs) if r % 2 == 0 else list(reversed(runs))
        for name in order:
            wait_until_quiet()
            if name == ours_name:
                out_dir = tempfile.mkdtemp(prefix="bench-embed-")
                fn, fn_args = run_ours, (str(model_dir), str(shards), out_dir, args.actors, args.cpus_per_actor,
                                         args.batch)
            else:
                fn, fn_args = setups[name]
            result, _, tree_peak = run_process_tree(fn, *fn_args)
            if name == ours_name:
                shutil.rmtree(out_dir, ignore_errors=True)  # the index it built: the vectors came back in result
            result["peak_pss_bytes"] = tree_peak
            runs[name].append(result)
            print(f"round {r + 1}: {name}: {result['images_per_s']:.0f} images/s once started, "
                  f"{result['second_half_images_per_s']:.0f} over the second half, "
                  f"start-up {result['startup_s']:.1f} s", flush=True)

    reference = runs[ours_name][0]["vectors"]
    for name, found in runs.items():
        for result in found:
            np.testing.assert_allclose(result.pop("vectors"), reference, atol=1e-4, err_msg=name)
    median = {name: statistics.median(r["images_per_s"] for r in found) for name, found in runs.items()}
    peer = max((n for n in setups), key=median.get)
    rows = []
    for name, found in runs.items():
        rows.append({"setup": name, "images/s once started (median)": f"{median[name]:.0f}",
                     "vs plain": f"{median[name] / median[peer]:.2f}",
                     "start-up s (median)": f"{statistics.median(r['startup_s'] for r in found):.1f}",
                     "wall s (median)": f"{statistics.median(r['wall_s'] for r in found):.1f}",
                     "peak memory (PSS, all processes)":
                         f"{max(r['peak_pss_bytes'] for r in found) / 2**20:.0f} MiB"})
    print_table(rows)
    print(f"peer (the fastest plain setup): {peer}")
    path = write_results("embed_throughput", {
        "images": args.images, "height": args.height, "width": args.width, "batch": args.batch,
        "rounds": args.rounds, "peer": peer, "ratio_vs_plain": median[ours_name] / median[peer],
        "runs": runs})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
