"""Checks of a dataset against a training config that can run before Ray or MLflow start.

Each reads only the manifest, Parquet footers and the train split's identity column, so
the trainer can refuse an impossible run (or say what a legal but surprising one will do)
in a second, instead of after a cluster, an MLflow run and N workers have started.

What P×K does with few images, and why these checks warn rather than refuse: torchreid's
``RandomIdentitySampler`` and fast-reid's ``NaiveIdentitySampler`` top up an identity that
has fewer than K images by sampling its images with replacement, silently. ``PKBatcher``
does the same, so a user coming from them expects ``train.k`` above some identities' counts
to work; we keep that, but say so when it holds for most or all identities, because then
every batch repeats images and the triplet loss sees fewer distinct positives than K
suggests. What cannot work at all (fewer identities than P, on the whole split or on
every worker) is refused with a ValueError naming the key and the fix.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from reidscale.data import shards


def check_row_groups(data_dir: str | Path, split: str, num_workers: int) -> int:
    """The number of row groups of ``split``; a ValueError when there are fewer than
    ``num_workers`` (each worker streams whole row groups, so some worker would get none)."""
    groups = sum(pq.ParquetFile(f).metadata.num_row_groups for f in shards.split_files(data_dir, split))
    if groups < num_workers:
        raise ValueError(
            f"{data_dir}: the {split} split has {groups} row group(s) for train.num_workers={num_workers}; "
            f"use train.num_workers<={groups}, or re-run python jobs/prepare_data.py with a smaller "
            f"rows_per_group (each worker streams whole row groups)")
    return groups


def _identities_per_row_group(data_dir: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(images per identity over the train split, distinct identities in each row group)."""
    identities, per_group = [], []
    for path in shards.split_files(data_dir, "train"):
        f = pq.ParquetFile(path)
        for g in range(f.num_row_groups):
            ids = f.read_row_group(g, columns=["identity"]).column("identity").to_numpy()
            identities.append(ids)
            per_group.append(len(np.unique(ids)))
    if not identities:
        raise ValueError(f"{data_dir}: the train split has no rows")
    _, counts = np.unique(np.concatenate(identities), return_counts=True)
    return counts, np.asarray(per_group, dtype=np.int64)


def check_pk(data_dir: str | Path, p: int, k: int, num_workers: int = 1) -> list[str]:
    """Check ``train.p``/``train.k`` against the train split; return warnings for a person to read.

    Raises ValueError (one line, naming the key) when no P×K batch can be formed: p < 2,
    k < 1, fewer train identities than P, or fewer than P identities on every worker even
    in the best split of the row groups. Warns (the returned strings) when K exceeds the
    image count of every identity or of most of them (topped up with replacement, see the
    module docstring), and when some epoch's split of the row groups may leave a worker
    fewer than P identities (that worker's epoch would then fail).
    """
    if p < 2 or k < 1:
        raise ValueError(f"train.p={p}, train.k={k}: P×K batches need train.p >= 2 and train.k >= 1")
    counts, per_group = _identities_per_row_group(data_dir)
    n = len(counts)
    if p > n:
        raise ValueError(f"train.p={p} exceeds the {n} train identities in {data_dir}: use train.p<={n}")
    warnings = []
    largest, median = int(counts.max()), float(np.median(counts))
    short = int((counts < k).sum())
    if k > largest:
        warnings.append(
            f"train.k={k} exceeds every identity's image count in {data_dir} (largest {largest}, median {median:g}, "
            f"{n} identities): every identity is topped up by sampling its images with replacement (as torchreid's "
            f"RandomIdentitySampler does), so every batch repeats images; train.k<={largest} avoids it")
    elif short * 2 > n:
        warnings.append(
            f"train.k={k}: {short} of {n} train identities ({short / n:.0%}) have fewer than {k} images (median "
            f"{median:g}) and are topped up by sampling with replacement (as torchreid's RandomIdentitySampler does)")
    if num_workers > 1:
        # worker r takes every num_workers-th row group of a permutation: floor or ceil of G/W of them;
        # an identity larger than a row group counts once per group, so these are upper bounds
        ordered = np.sort(per_group)
        fewest = int(ordered[: len(ordered) // num_workers].sum())
        most = int(ordered[::-1][: math.ceil(len(ordered) / num_workers)].sum())
        if most < p:
            raise ValueError(
                f"train.p={p}: with train.num_workers={num_workers} no worker can get {p} identities (at most "
                f"{most} from its {math.ceil(len(ordered) / num_workers)} row groups of {data_dir}); use a smaller "
                f"train.p or fewer workers")
        if fewest < p:
            warnings.append(
                f"train.p={p}: with train.num_workers={num_workers} a worker may get as few as {fewest} identities "
                f"in some epoch (the {len(ordered) // num_workers} smallest of {len(ordered)} row groups), and its "
                f"epoch then fails; use a smaller train.p, fewer workers, or smaller row groups "
                f"(python jobs/prepare_data.py rows_per_group=...)")
    return warnings
