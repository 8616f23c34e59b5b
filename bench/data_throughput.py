"""P×K batches per second: our Ray pipeline vs a torch DataLoader over JPEG files.

Ours (what a training worker runs): ``pipeline.worker_epochs`` (one stream of Ray tasks for all
the epochs, one task per ``--rows-per-task`` rows of consecutive Parquet row groups,
training's ``data_rows_per_task`` by default: read + ``transforms.decode_batch``, split by
epoch) → ``PKStream`` on the driver, one worker's whole stream (rank 0 of 1), local
Ray with 2 CPUs.
Standard: ``torch.utils.data.DataLoader`` with 2 worker processes and torchreid's
``RandomIdentitySampler`` (written out below), each item read from a folder of the same
JPEG files and decoded/augmented by the same ``transforms.decode_batch``.

Both see the same images (a synthetic set, ``--identities`` train identities at 256×128,
long-tailed counts), the same P×K and transforms, on the same machine, one after the other,
each in its own fresh process. Per run: ``--epochs`` epochs; the first epoch includes worker
start-up (Ray's first decode workers, DataLoader worker forks; not ``ray.init``) and the last one
is the drain, both reported apart; the rate is batches over wall time of the epochs between
them, the steady state, each epoch's sampler built afresh as training does (ours: one dataset
across the epochs; the DataLoader: its workers forked again per epoch, torch's default).
Why not the last epoch: ours decodes ahead of its consumer across epoch boundaries, so the last
epoch drains blocks decoded during the earlier ones and ran at 1.5-2.5× the others' rate
(2026-12-07: 10,067-14,281 decoded/s against 5,176-5,769); counting it put ours 6-10% (6-epoch runs) above its
steady state, the rate a long training run sees. Peak memory is the largest sum of PSS (proportional set
size: shared pages split between the processes that map them) over the run's whole process
tree (driver, Ray's GCS/raylet/agents/workers or the DataLoader workers), sampled every 1 s
from the bench's own process (``_common.run_process_tree``), not from inside the measured one.

"decoded/s" counts decodes: the DataLoader decodes every image of a batch, repeats included;
ours decodes each row once per epoch and repeats the rows of identities with fewer than K
images, so its batches hold more images than it decoded. The decode limit (``decode_limit``)
is in decodes too, so "of the decode limit" compares like with like. It is one core's speed
times the cores; "of side-by-side decode" divides by what that many plain processes decoding at
once did (``decode_side_by_side``), which is what the cores deliver together on this machine.
The "blocks counted" row runs ours with a consumer that only counts the decoded rows: the most
the pipeline could deliver if P×K batching and stacking cost nothing.

    python bench/data_throughput.py [--identities 500] [--epochs 5] [--p 16] [--k 4] [--only NAME]
                                    [--rows-per-task N] [--source-size 512x256]
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from _common import print_table, run_process_tree, write_results  # noqa: E402

HEIGHT, WIDTH = 256, 128
ROWS_PER_GROUP = 128  # the demo's row groups (~10 identities each)


# --- the data set, written once in both forms -------------------------------------------

def build_data(work: Path, identities: int, source: tuple[int, int] = (HEIGHT, WIDTH)) -> tuple[Path, Path]:
    """(shard dir, JPEG folder) for ``identities`` train identities stored at ``source`` (height,
    width); reused when present. Crops stored larger than the training size are resized in the
    decode, as a detector's crops are."""
    from reidscale.data.shards import read_manifest, write_dataset
    from reidscale.data.sources.synthetic import SyntheticConfig, generate

    tag = str(identities) if source == (HEIGHT, WIDTH) else f"{identities}_{source[0]}x{source[1]}"
    shards, folder = work / f"shards_{tag}", work / f"jpeg_{tag}"
    if (shards / "manifest.json").is_file() and (folder / "_done").is_file():
        return shards, folder
    # train_fraction just under 1: the generator keeps a few test identities, unused here
    cfg = SyntheticConfig(num_identities=identities + 5, train_fraction=identities / (identities + 5),
                          height=source[0], width=source[1], seed=0)
    folder.mkdir(parents=True, exist_ok=True)

    def train_records():
        for rec in generate(cfg):
            if rec["split"] == "train":
                path = folder / f"{rec['identity']:05d}" / Path(rec["path"]).name
                path.parent.mkdir(exist_ok=True)
                path.write_bytes(rec["image"])  # the very bytes the shards hold
                yield rec

    write_dataset(train_records(), shards, source="synthetic", rows_per_group=ROWS_PER_GROUP, groups_per_shard=8)
    (folder / "_done").write_text("ok\n")
    assert read_manifest(shards)["num_classes"] == identities
    return shards, folder


# --- ours --------------------------------------------------------------------------------

def run_ours(shards: str, p: int, k: int, epochs: int, normalise_here: bool = False,
             rows_per_task: int = 1, blocks_only: bool = False) -> dict:
    """One worker's epochs through the pipeline, exactly as the training loop builds it.

    Batches arrive uint8; training normalises them on its device (``model_input``), which on
    a GPU is the GPU's work. ``normalise_here``: do that normalisation in this process on
    the CPU, as a CPU-only training run does. ``blocks_only``: count the decoded blocks' rows
    and build no batches, the Ray side's own ceiling: what no work in the consumer (P×K
    bookkeeping, stacking) could take the pipeline past."""
    import ray

    from reidscale.data.pipeline import PKStream, row_groups, worker_epochs
    from reidscale.data.transforms import TransformConfig
    from reidscale.models.inference import model_input

    cfg = TransformConfig(height=HEIGHT, width=WIDTH)
    t_start = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    groups = row_groups(shards, "train")
    stream = PKStream(p, k, seed=0)
    blocks = worker_epochs(groups, cfg, epochs=range(epochs), seed=0, rank=0, world=1, rows_per_task=rows_per_task)
    per_epoch = []
    for epoch in range(epochs):
        t0, cpu0, batches, images, seen = time.perf_counter(), time.process_time(), 0, 0, stream.rows_seen
        if blocks_only:
            for block in blocks.epoch(epoch):
                stream.rows_seen += len(block["label"])
        for batch in () if blocks_only else stream.epoch(blocks.epoch(epoch), epoch):
            if normalise_here:
                model_input(batch["image"], cfg)
            batches += 1
            images += len(batch["label"])
        # decoded: each row once per epoch; images: what the batches hold, rows of identities
        # with fewer than K images repeated (no decode of their own)
        per_epoch.append({"batches": batches, "images": images, "decoded": stream.rows_seen - seen,
                          "seconds": time.perf_counter() - t0, "driver_cpu_seconds": time.process_time() - cpu0})
    ray.shutdown()
    total = time.perf_counter() - t_start
    return {"epochs": per_epoch, "total_seconds": total, "decode_errors": stream.decode_errors}


# --- the standard way --------------------------------------------------------------------

class RandomIdentitySampler:
    """torchreid's RandomIdentitySampler (Hermans et al. 2017 P×K): every epoch, each identity's
    indices are shuffled and cut into K-chunks (topped up with replacement below K, the rest
    of a chunk dropped); P identities are drawn at random per batch until fewer than P remain."""

    def __init__(self, pids: list[int], batch_size: int, num_instances: int):
        self.num_instances, self.num_pids_per_batch = num_instances, batch_size // num_instances
        self.index_dic = defaultdict(list)
        for index, pid in enumerate(pids):
            self.index_dic[pid].append(index)
        self.pids = list(self.index_dic)
        self.length = sum(max(len(v), num_instances) - max(len(v), num_instances) % num_instances
                          for v in self.index_dic.values())

    def __iter__(self):
        batch_idxs_dict = defaultdict(list)
        for pid in self.pids:
            idxs = copy.deepcopy(self.index_dic[pid])
            if len(idxs) < self.num_instances:
                idxs = list(np.random.choice(idxs, size=self.num_instances, replace=True))
            random.shuffle(idxs)
            batch_idxs = []
            for idx in idxs:
                batch_idxs.append(idx)
                if len(batch_idxs) == self.num_instances:
                    batch_idxs_dict[pid].append(batch_idxs)
                    batch_idxs = []
        avai_pids = copy.deepcopy(self.pids)
        final_idxs = []
        while len(avai_pids) >= self.num_pids_per_batch:
            for pid in random.sample(avai_pids, self.num_pids_per_batch):
                final_idxs.extend(batch_idxs_dict[pid].pop(0))
                if not batch_idxs_dict[pid]:
                    avai_pids.remove(pid)
        return iter(final_idxs)

    def __len__(self):
        return self.length


class JpegFolder:
    """A map-style dataset over <folder>/<identity>/<file>.jpg; items decoded by our transforms."""

    def __init__(self, folder: Path):
        from reidscale.data.transforms import TransformConfig

        self.cfg = TransformConfig(height=HEIGHT, width=WIDTH)
        self.files = sorted(p for p in folder.glob("*/*.jpg"))
        self.pids = [int(p.parent.name) for p in self.files]

    def __len__(self):
        return len(self.files)

    def __getitem__(self, index: int):
        import torch

        from reidscale.data.transforms import decode_batch

        data = self.files[index].read_bytes()
        out = decode_batch({"image": np.array([data], dtype=object)}, self.cfg, train=True,
                           seed=random.getrandbits(63))
        return torch.from_numpy(out["image"][0]), self.pids[index]


def run_dataloader(folder: str, p: int, k: int, epochs: int, workers: int = 2) -> dict:
    import torch
    from torch.utils.data import DataLoader

    random.seed(0)
    np.random.seed(0)
    t_start = time.perf_counter()
    dataset = JpegFolder(Path(folder))
    # fork, Linux's default for a plain script: this function runs in a spawned process,
    # whose children would otherwise be spawned too (each epoch re-importing torch: ~2x slower)
    loader = DataLoader(dataset, batch_size=p * k, sampler=RandomIdentitySampler(dataset.pids, p * k, k),
                        num_workers=workers, drop_last=True, multiprocessing_context="fork")
    per_epoch = []
    for _ in range(epochs):
        t0, batches, images = time.perf_counter(), 0, 0
        cpu0 = time.process_time()
        for imgs, _labels in loader:
            batches += 1
            images += len(imgs)
        # every image of a batch is a decode of its own, repeats included
        per_epoch.append({"batches": batches, "images": images, "decoded": images,
                          "seconds": time.perf_counter() - t0, "driver_cpu_seconds": time.process_time() - cpu0})
    total = time.perf_counter() - t_start
    del loader
    return {"epochs": per_epoch, "total_seconds": total, "torch_threads": torch.get_num_threads()}


# --- report ------------------------------------------------------------------------------

def _rates(result: dict) -> dict:
    """Rates over the steady-state epochs: all but the first (start-up) and the last (the drain)."""
    epochs = result["epochs"]
    if len(epochs) < 3:
        raise ValueError(f"{len(epochs)} epochs: the steady-state rate needs at least 3 (first and last apart)")
    warm = epochs[1:-1]
    seconds = sum(e["seconds"] for e in warm)
    first, last = epochs[0], epochs[-1]
    return {
        "batches_per_s": sum(e["batches"] for e in warm) / seconds,
        "images_per_s": sum(e["images"] for e in warm) / seconds,
        "decoded_per_s": sum(e["decoded"] for e in warm) / seconds,
        "first_epoch_batches_per_s": first["batches"] / first["seconds"],
        "last_epoch_batches_per_s": last["batches"] / last["seconds"],
        "batches_per_epoch": first["batches"],
        # CPU the consuming process used per wall second: what is left for decoding on 2 cores
        "driver_cpu_share": sum(e["driver_cpu_seconds"] for e in warm) / seconds,
    }


def decode_limit(shards: Path, rows_per_task: int, cores: int = 2, passes: int = 3) -> dict:
    """The machine's ceiling: CPU seconds per image of what a decode task does (read its row
    groups, ``decode_batch``: decode + training augmentation, uint8 out) over every train row,
    one thread, no Ray, into a reused output buffer as the tasks decode; ``cores`` cores can do
    at most ``cores`` over that many images per second. The best of ``passes`` passes after a
    warm one: the first call of a process pays for imports and caches, and this VM's other
    load only ever adds (two single passes here read 435 and 274 µs)."""
    from reidscale.data.pipeline import decode_tasks, row_groups
    from reidscale.data.transforms import TransformConfig

    cfg = TransformConfig(height=HEIGHT, width=WIDTH)
    groups = row_groups(shards, "train")
    tasks = [{k: np.array([v], dtype=object) for k, v in t.items()}
             for t in decode_tasks([(g, i) for i, g in enumerate(groups)], rows_per_task)]
    images = sum(g.rows for g in groups)
    per_pass = []
    for _ in range(passes + 1):
        start = time.process_time()
        _decode_pass(tasks, cfg)
        per_pass.append(time.process_time() - start)
    cpu = min(per_pass[1:])
    return {"cpu_us_per_image": cpu / images * 1e6, "cores": cores, "images_per_s": cores * images / cpu,
            "cpu_us_per_image_by_pass": [c / images * 1e6 for c in per_pass],
            "side_by_side": decode_side_by_side(tasks, images, cores, passes)}


def _decode_pass(tasks: list, cfg) -> None:
    """What the training decode tasks do, in this process: read + decode + augment, reused buffer."""
    from reidscale.data.pipeline import read_decode_row_groups

    for task in tasks:
        read_decode_row_groups(task, cfg, train=True, reuse_output=True)


def _decode_share(tasks: list, barrier, passes: int) -> list[tuple[float, float]]:
    from reidscale.data.transforms import TransformConfig

    cfg = TransformConfig(height=HEIGHT, width=WIDTH)
    spans = []
    for _ in range(passes + 1):
        barrier.wait()
        start = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
        _decode_pass(tasks, cfg)
        spans.append((start, time.perf_counter()))
    return spans


def decode_side_by_side(tasks: list, images: int, cores: int, passes: int) -> dict:
    """The same decode, ``cores`` plain processes at once (no Ray), each over its share of the
    tasks, started together per pass: images over the wall time from the first start to the
    last end. What the cores deliver together, which on a VM can be less than ``cores`` times
    one core alone (shared caches, memory bandwidth, the hypervisor)."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        barrier = manager.Barrier(cores)
        with ctx.Pool(cores) as pool:
            shares = [pool.apply_async(_decode_share, (tasks[i::cores], barrier, passes)) for i in range(cores)]
            spans = [s.get() for s in shares]
    walls = [max(s[j][1] for s in spans) - min(s[j][0] for s in spans) for j in range(passes + 1)]
    best = min(walls[1:])
    return {"images_per_s": images / best, "wall_seconds_by_pass": walls}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--identities", type=int, default=500)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--p", type=int, default=16)
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--work-dir", default="/tmp/reidscale_bench_data")
    parser.add_argument("--only", default=None, help="run one pipeline: dataloader, ours, ours_cpu_normalise or ours_blocks_only")
    parser.add_argument("--source-size", default=f"{HEIGHT}x{WIDTH}",
                        help="HxW the crops are stored at; larger than the training size is resized in the decode")
    parser.add_argument("--rows-per-task", type=int, default=None,
                        help="rows per decode task (default: training's data_rows_per_task)")
    args = parser.parse_args()
    if args.epochs < 3:
        parser.error(f"--epochs {args.epochs}: at least 3 (the first and the last are reported apart)")
    if args.rows_per_task is None:
        from reidscale.train.config import TrainConfig

        args.rows_per_task = TrainConfig().data_rows_per_task

    try:
        source = tuple(int(v) for v in args.source_size.lower().split("x"))
        if len(source) != 2 or min(source) < 32:
            raise ValueError
    except ValueError:
        parser.error(f"--source-size {args.source_size!r}: HxW, both at least 32, e.g. 512x256")
    t0 = time.perf_counter()
    shards, folder = build_data(Path(args.work_dir), args.identities, source)
    from reidscale.data.shards import read_manifest

    train = read_manifest(shards)["splits"]["train"]
    print(f"data: {train['images']} train images of {train['identities']} identities stored at "
          f"{source[0]}x{source[1]}, trained at {HEIGHT}x{WIDTH} "
          f"({time.perf_counter() - t0:.0f} s to build or find)", flush=True)

    pipelines = {
        "dataloader": ("torch DataLoader, 2 workers, RandomIdentitySampler, JPEG files",
                       lambda: run_process_tree(run_dataloader, str(folder), args.p, args.k, args.epochs)),
        "ours": ("ours: Ray tasks (Parquet row groups → decode) → PKStream, uint8 to the device",
                 lambda: run_process_tree(run_ours, str(shards), args.p, args.k, args.epochs,
                                          False, args.rows_per_task)),
        "ours_cpu_normalise": ("ours, normalised in this process on the CPU (CPU-only training)",
                               lambda: run_process_tree(run_ours, str(shards), args.p, args.k, args.epochs, True,
                                                        args.rows_per_task)),
        "ours_blocks_only": ("ours, blocks counted, no P×K batches: the Ray side's ceiling",
                             lambda: run_process_tree(run_ours, str(shards), args.p, args.k, args.epochs, False,
                                                      args.rows_per_task, True)),
    }
    limit = decode_limit(shards, args.rows_per_task)
    side = limit["side_by_side"]["images_per_s"]
    print(f"decode + augmentation: {limit['cpu_us_per_image']:.0f} µs of CPU per image: {limit['cores']} cores "
          f"can do at most {limit['images_per_s']:.0f} images/s at one core's speed; {limit['cores']} processes "
          f"side by side did {side:.0f} images/s", flush=True)
    rows, results = [], {}
    for key, (name, run) in pipelines.items():
        if args.only not in (None, key):
            continue
        out, driver_peak, tree_peak = run()
        out["peak_pss_bytes"] = tree_peak
        rates = _rates(out)
        results[key] = {**out, **rates, "driver_peak_rss_bytes": driver_peak}
        builds_batches = key != "ours_blocks_only"
        ratio = (rates["batches_per_s"] / results["dataloader"]["batches_per_s"]
                 if "dataloader" in results and builds_batches else None)
        if ratio is not None and key != "dataloader":
            results[key]["ratio_batches_per_s_vs_dataloader"] = ratio
        def batch_figure(text: str) -> str:  # the blocks-only row builds no batches
            return text if builds_batches else ""

        rows.append({"pipeline": name, "P×K batches/s": batch_figure(f"{rates['batches_per_s']:.2f}"),
                     "vs DataLoader": f"{ratio:.2f}" if ratio else "",
                     "images/s": batch_figure(f"{rates['images_per_s']:.0f}"),
                     "decoded/s": f"{rates['decoded_per_s']:.0f}",
                     "decoded/s of the decode limit": f"{rates['decoded_per_s'] / limit['images_per_s']:.0%}",
                     "of side-by-side decode": f"{rates['decoded_per_s'] / side:.0%}",
                     "1st epoch batches/s": batch_figure(f"{rates['first_epoch_batches_per_s']:.2f}"),
                     "last epoch batches/s": batch_figure(f"{rates['last_epoch_batches_per_s']:.2f}"),
                     "batches/epoch": batch_figure(str(rates["batches_per_epoch"])),
                     "driver CPU": f"{rates['driver_cpu_share']:.2f} cores",
                     "peak memory (PSS, all processes)": f"{out['peak_pss_bytes'] / 2**20:.0f} MiB"})
    print_table(rows)
    if args.only is None:
        name = "data_throughput" if source == (HEIGHT, WIDTH) else f"data_throughput_{source[0]}x{source[1]}"
        write_results(name, {
            "identities": args.identities, "train_images": train["images"], "height": HEIGHT, "width": WIDTH,
            "source_height": source[0], "source_width": source[1],
            "p": args.p, "k": args.k, "epochs": args.epochs, "rows_per_group": ROWS_PER_GROUP,
            "rows_per_task": args.rows_per_task,
            "decode_limit": limit, "results": results})


if __name__ == "__main__":
    main()
