"""Peak memory of the process that builds a gallery index: in-process build vs shard tasks.

    python bench/index_build_memory.py --sizes 200000 400000 --dim 128

For each size, a random unit-norm N×D gallery is written to an .npy once (runs/bench/index_build_memory/),
then two builds run, each in its own spawned process so its peak RSS (VmHWM) is its own:

* ``in-process``: ``load_precomputed`` (the vectors in memory) → ``build_index``;
* ``shard tasks``: ``open_precomputed_rows`` (an ``index.rows`` source) → ``build_index(shard_tasks=True)``
  on a private Ray: each shard's task reads its own rows; the driver reads the training sample.

Both builds use the same factory and shards and must write the same shard files (checked).
Calibration is off (it would open the whole index in the driver; see docs/scaling.md).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import time
from pathlib import Path

import numpy as np

OUT = Path("runs/bench/index_build_memory")


def _peak_rss_mb() -> float:
    """This process's peak resident memory (VmHWM). Not ru_maxrss: across fork+exec Linux carries the
    parent's resident size at the fork into it, so a spawned child reports at least its parent's."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def _build(path: str, out: str, tasks: bool, factory: str, shards: int, queue) -> None:
    from reidscale.index.build import build_index
    from reidscale.index.job import load_precomputed, open_precomputed_rows

    t0 = time.time()
    vectors, meta, _ = (open_precomputed_rows if tasks else load_precomputed)(path)
    if tasks:
        from reidscale.ray_runtime import init_ray

        init_ray(num_cpus=2, include_dashboard=False)
    manifest = build_index(vectors, meta, out, factory=factory, num_shards=shards, train_size=16384,
                           calibration=None, shard_tasks=tasks, log=lambda *_: None)
    queue.put({"peak_rss_mb": _peak_rss_mb(), "time_s": time.time() - t0,
               "shards": [e["sha256"] for e in manifest["shards"]]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[200_000, 400_000])
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--factory", default="IVF256,PQ32x4fs,RFlat")
    args = parser.parse_args()
    OUT.mkdir(parents=True, exist_ok=True)
    ctx = mp.get_context("spawn")
    rows = []
    for n in args.sizes:
        path = OUT / f"gallery-{n}x{args.dim}.npy"
        if not path.is_file():
            x = np.random.default_rng(n).standard_normal((n, args.dim)).astype(np.float32)
            np.save(path, x / np.linalg.norm(x, axis=1, keepdims=True))
        result = {}
        for tasks in (False, True):
            shutil.rmtree(OUT / f"index-{n}-{int(tasks)}", ignore_errors=True)  # a kept index would build nothing
            queue = ctx.Queue()
            proc = ctx.Process(target=_build, args=(str(path), str(OUT / f"index-{n}-{int(tasks)}"), tasks,
                                                    args.factory, args.shards, queue))
            proc.start()
            result[tasks] = queue.get()
            proc.join()
        assert result[False]["shards"] == result[True]["shards"], "shard tasks wrote other bytes"
        row = {"n": n, "dim": args.dim, "vectors_mb": n * args.dim * 4 / 2**20, "factory": args.factory,
               "in_process_peak_mb": result[False]["peak_rss_mb"], "in_process_s": result[False]["time_s"],
               "shard_tasks_driver_peak_mb": result[True]["peak_rss_mb"], "shard_tasks_s": result[True]["time_s"]}
        rows.append(row)
        print(f"{n:>9,} × {args.dim}: vectors {row['vectors_mb']:.0f} MB | in-process peak {row['in_process_peak_mb']:.0f} MB "
              f"({row['in_process_s']:.1f}s) | shard-task driver peak {row['shard_tasks_driver_peak_mb']:.0f} MB "
              f"({row['shard_tasks_s']:.1f}s); same shard bytes", flush=True)
    (OUT / "results.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
