"""Peak memory of P×K batch formation as the number of identities grows (metadata scale).

Ours: ``PKBatcher`` fed a stream of (identity, row id) in row-group order (rows clustered by
identity, 128-row groups visited in a seeded random order), as one training worker sees it.
Reference: the torchreid/fast-reid ``RandomIdentitySampler`` algorithm, which first builds
identity → all its indices for the whole training set in one process.
Each configuration runs in its own process (``run_isolated``) so the peaks are independent.

    python bench/sampler_memory.py [--sizes 10000 100000 1000000] [--k 4]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections import defaultdict
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np  # noqa: E402

from _common import gib, print_table, run_isolated, write_results  # noqa: E402

P, ROWS_PER_GROUP = 16, 128


def _row_groups(n_ids: int, k: int, seed: int = 0):
    """Row groups of a dataset with n_ids identities × k images, in a random visiting order."""
    n_rows = n_ids * k
    n_groups = -(-n_rows // ROWS_PER_GROUP)
    for g in np.random.default_rng(seed).permutation(n_groups):
        lo, hi = g * ROWS_PER_GROUP, min((g + 1) * ROWS_PER_GROUP, n_rows)
        rows = np.arange(lo, hi, dtype=np.int64)
        yield rows // k, rows  # identity of row r is r // k: rows clustered by identity


def ours(n_ids: int, k: int) -> dict:
    from reidscale.data.sampler import PKBatcher

    batcher = PKBatcher(P, k, seed=0)
    batches, t0 = 0, time.perf_counter()
    for identities, rows in _row_groups(n_ids, k):
        for identity, row in zip(identities.tolist(), rows.tolist()):
            batcher.add(identity, row)
        for _ in batcher.ready():
            batches += 1
    for _ in batcher.flush():
        batches += 1
    return {"batches": batches, "seconds": time.perf_counter() - t0}


def random_identity_sampler(n_ids: int, k: int) -> dict:
    """torchreid's RandomIdentitySampler: index every identity's images, then build the epoch."""
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    index = defaultdict(list)
    for identities, rows in _row_groups(n_ids, k):
        for identity, row in zip(identities.tolist(), rows.tolist()):
            index[identity].append(row)
    chunks = []
    for identity, rows in index.items():
        idxs = list(rows) if len(rows) >= k else list(rng.choice(rows, size=k, replace=True))
        rng.shuffle(idxs)
        chunks.extend([idxs[i : i + k] for i in range(0, len(idxs) - k + 1, k)])
    order = rng.permutation(len(chunks))
    batches = len(order) // P
    final = [chunks[i] for i in order[: batches * P]]
    return {"batches": batches, "seconds": time.perf_counter() - t0, "final_idxs": len(final)}


def baseline_rss() -> dict:
    from reidscale.data.sampler import PKBatcher  # noqa: F401  same imports as `ours`

    return {"batches": 0, "seconds": 0.0}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000, 1_000_000])
    parser.add_argument("--k", type=int, default=4)
    args = parser.parse_args()
    _, base = run_isolated(baseline_rss)
    rows, results = [], []
    for n in args.sizes:
        for name, fn in (("PKBatcher (ours, streaming)", ours), ("RandomIdentitySampler (torchreid)", random_identity_sampler)):
            out, peak = run_isolated(fn, n, args.k)
            results.append({"sampler": name, "identities": n, "images": n * args.k, "peak_rss_bytes": peak,
                            "above_interpreter_bytes": peak - base, **out})
            rows.append({"sampler": name, "identities": f"{n:,}", "images": f"{n * args.k:,}",
                         "peak RSS": gib(peak), "above interpreter": f"{(peak - base) / 2**20:.0f} MiB",
                         "batches": out["batches"], "seconds": f"{out['seconds']:.1f}"})
    print_table(rows)
    write_results("sampler_memory", {"p": P, "k": args.k, "rows_per_group": ROWS_PER_GROUP,
                                     "interpreter_rss_bytes": base, "results": results})


if __name__ == "__main__":
    main()
