"""The Ray Data layer: read shards, decode/augment on Ray workers, stream to trainers.

Only this module and the Ray-facing parts of ``train``/``embed`` import Ray; everything
it calls (transforms, sampler) is plain Python tested without a cluster.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from reidscale.data import shards
from reidscale.data.sampler import PKBatcher
from reidscale.data.transforms import TransformConfig, decode_batch


def read_split(root: str | Path, split: str, *, verify: bool = True):
    """A lazy Ray Dataset over one split's shards (checked against the manifest first)."""
    import ray.data

    files = shards.verify_split(root, split) if verify else shards.split_files(root, split)
    return ray.data.read_parquet([str(f) for f in files])


def decoded(ds, cfg: TransformConfig, *, train: bool, batch_size: int = 64):
    """Attach decode (+ augmentation when ``train``) as a streaming map on Ray workers."""
    return ds.map_batches(
        decode_batch,
        fn_kwargs={"cfg": cfg, "train": train},
        batch_size=batch_size,
        batch_format="numpy",
    )


class PKStream:
    """Turn a worker's Ray Data shard into P×K numpy batches, counting bad rows.

    Yields dicts ``image`` (P*K, 3, H, W) float32, ``label`` (P*K,) int64,
    ``identity`` (P*K,) int64, ordered identity by identity.
    """

    def __init__(self, p: int, k: int, *, seed: int, window_identities: int | None = None):
        self.p, self.k, self.seed = p, k, seed
        self.window_identities = window_identities
        self.decode_errors = 0
        self.rows_seen = 0

    def epoch(self, data_iterator, epoch: int, read_batch_size: int = 64) -> Iterator[dict]:
        batcher = PKBatcher(self.p, self.k, window_identities=self.window_identities, seed=self.seed * 100_003 + epoch)
        for batch in data_iterator.iter_batches(batch_size=read_batch_size, batch_format="numpy"):
            ok = batch["decode_ok"]
            self.rows_seen += len(ok)
            self.decode_errors += int((~ok).sum())
            for i in np.flatnonzero(ok):
                batcher.add(batch["identity"][i], (batch["image"][i], batch["label"][i]))
            for pk in batcher.ready():
                yield self._stack(pk)
        for pk in batcher.flush():
            yield self._stack(pk)

    @staticmethod
    def _stack(pk: list) -> dict:
        return {
            "image": np.stack([row[0] for _, row in pk]),
            "label": np.asarray([row[1] for _, row in pk], dtype=np.int64),
            "identity": np.asarray([identity for identity, _ in pk], dtype=np.int64),
        }
