"""The Ray layer of the data: per-worker, deterministic streams of decoded row groups → P×K
batches for training (plain Ray tasks), and a split's decoded rows for inference (Ray Data).

Why not ``read_parquet`` + Ray Train's ``streaming_split``: the split hands blocks to
whichever worker asks first, so neither the assignment nor the order of rows repeats
between runs, and a resumed run could not replay the batches an uninterrupted run saw.
Instead each epoch permutes the shards' row groups with ``(seed, epoch)``, worker ``r``
takes every ``world``-th row group, and a stream of Ray tasks (one per row group or per few
consecutive ones, fetched in order, running ahead across epoch boundaries) reads and decodes
them on Ray's CPU workers. A row group holds whole identities (see ``shards``), so workers
never split an identity, and no row goes to two workers in one epoch.

Only this module and the Ray-facing parts of ``train``/``embed`` import Ray; what it calls
(transforms, sampler, :func:`ordered_stream`) is plain Python tested without a cluster."""

from __future__ import annotations

import hashlib
import itertools
from collections import deque
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np
import pyarrow.parquet as pq

from reidscale.data import shards
from reidscale.data.sampler import PKBatcher, RandomBatcher
from reidscale.data.transforms import TransformConfig, decode_batch


class RowGroup(NamedTuple):
    """One Parquet row group: the unit of per-worker streams and shuffling."""

    path: str
    group: int
    rows: int


def row_groups(root: str | Path, split: str) -> list[RowGroup]:
    """Every row group of a split, in manifest order (footer reads only)."""
    out = []
    for path in shards.split_files(root, split):
        meta = pq.ParquetFile(path).metadata
        out.extend(RowGroup(str(path), g, meta.row_group(g).num_rows) for g in range(meta.num_row_groups))
    return out


def _mix(*values: int) -> int:
    digest = hashlib.blake2b(b"/".join(str(v).encode() for v in values), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def epoch_assignment(groups: list[RowGroup], epoch: int, seed: int, rank: int,
                     world: int) -> list[tuple[int, RowGroup]]:
    """This worker's (global index, group) list for ``epoch``: a seeded permutation, strided by rank."""
    order = np.random.default_rng(_mix(seed, epoch)).permutation(len(groups))
    return [(int(i), groups[i]) for i in order[rank::world]]


TRAIN_COLUMNS = ("image", "identity", "label", "row_id", "camera")
# a Ray worker process with numpy, pyarrow and Pillow loaded (Ray Data measured 128 MiB)
WORKER_BASE_MEMORY = 256 * 2**20


def decode_tasks(groups: list[tuple[RowGroup, int]], rows_per_task: int) -> list[dict]:
    """The decode tasks (one Ray task each in :func:`worker_stream`, one Ray Data input row each
    in :func:`split_dataset`): consecutive ``(group, seed)`` pairs packed until a task holds at
    least ``rows_per_task`` rows (a row group is never split).

    Why pack: a task costs Ray a fixed few milliseconds (scheduling, the object-store put of its
    block, its metadata) whatever its size; with the demo's 128-row groups, 512 rows per task ran
    1.15× the images/s of one group per task (bench/data_throughput.py), 1024 less again (fewer
    tasks to keep both cores busy as an epoch starts and ends). Groups of the dataset configs'
    512 rows go one per task.
    """
    if rows_per_task < 1:
        raise ValueError(f"rows_per_task: must be >= 1, got {rows_per_task}")
    tasks, current, rows = [], [], 0
    for group, seed in groups:
        current.append((group, seed))
        rows += group.rows
        if rows >= rows_per_task:
            tasks.append(current)
            current, rows = [], 0
    if current:
        tasks.append(current)
    return [{"path": [str(g.path) for g, _ in t], "row_group": [int(g.group) for g, _ in t],
             "seed": [int(seed) for _, seed in t]} for t in tasks]


class _OutputBuffer:
    """One growing uint8 buffer per decode process, handed out again task after task, not cleared
    (:func:`~reidscale.data.transforms.decode_batch` writes every element of its ``out``).

    Why: a fresh 50-60 MB array per task is fresh pages the kernel must fault in and zero on
    first write; on this 2-core VM that was 110-220 µs of system time per 256×128 row, as
    much as the decode itself (a reused buffer: 6 µs). Clearing the reused one was another 4%
    of a decode process's CPU. Reuse is safe only where the array leaves the process before
    the next call: a Ray task's returned block is copied into the object store when the task
    returns it, and a worker process runs one task at a time.
    """

    def __init__(self):
        self._buffer = np.empty(0, dtype=np.uint8)

    def take(self, shape: tuple) -> np.ndarray:
        """An array of ``shape`` over the buffer, holding whatever the last task left there."""
        size = int(np.prod(shape))
        if self._buffer.size < size:
            self._buffer = np.empty(size, dtype=np.uint8)
        return self._buffer[:size].reshape(shape)


_TASK_OUTPUT = _OutputBuffer()


def read_decode_row_groups(batch: dict, cfg: TransformConfig, train: bool, columns: tuple = TRAIN_COLUMNS,
                           reuse_output: bool = False) -> dict:
    """A decode task's work, on a one-row batch per task (a training stream's Ray task, or
    :func:`split_dataset`'s Ray Data map): each row (from :func:`decode_tasks`) names row
    groups; output their decoded rows, in order, each group augmented with its own seed.

    Images leave the task as uint8 N×3×H×W, not normalised float32: a quarter of the bytes
    through the object store, and the consumer's window pins whole blocks while their rows
    wait for a batch (1.5× the batches/s of float32 blocks and 1 GB less memory in
    bench/data_throughput.py). They stay uint8 to the model's device, where
    ``models.inference.model_input`` normalises them.

    ``reuse_output``: decode into this process's :class:`_OutputBuffer`, so the returned
    ``image`` is overwritten by the next call: only for Ray tasks, whose output Ray copies
    out when they return.
    """
    tables, seeds = [], []
    for paths, groups, task_seeds in zip(batch["path"], batch["row_group"], batch["seed"]):
        for path, group, seed in zip(paths, groups, task_seeds):
            tables.append(pq.ParquetFile(str(path)).read_row_group(int(group), columns=list(columns)))
            seeds.append(int(seed))
    # every group decodes into its slice of one array: no concatenation of the pixels afterwards
    shape = (sum(t.num_rows for t in tables), 3, cfg.height, cfg.width)
    images = _TASK_OUTPUT.take(shape) if reuse_output else np.empty(shape, dtype=np.uint8)
    parts, start = [], 0
    for table, seed in zip(tables, seeds):
        cols = {name: table.column(name).to_numpy(zero_copy_only=False) for name in table.column_names}
        end = start + table.num_rows
        parts.append(decode_batch(cols, cfg, train=train, seed=seed, normalise=False, out=images[start:end]))
        start = end
    result = {k: np.concatenate([p[k] for p in parts]) for k in parts[0] if k != "image"}
    result["image"] = images
    if "epoch" in batch:  # tasks of a several-epoch stream: which epoch each row is for
        result["epoch"] = np.full(len(images), int(batch["epoch"][0]), dtype=np.int64)
    return result


def _task_batch(task: dict) -> dict:
    """One decode task as the one-row batch :func:`read_decode_row_groups` takes (each field a
    1-element object array: ``np.array([list])`` would make a 2-D array of the list's items)."""
    batch = {}
    for key, value in task.items():
        batch[key] = np.empty(1, dtype=object)
        batch[key][0] = value
    return batch


def _decode_task(task: dict, cfg: TransformConfig, train: bool) -> dict:
    """A Ray task's body: decode one task's row groups into this process's reused buffer (Ray
    copies the returned arrays into the object store when the task returns, before the process
    runs another task, which is what makes ``reuse_output`` safe here)."""
    return read_decode_row_groups(_task_batch(task), cfg, train, reuse_output=True)


def ordered_stream(items: Iterable, submit, fetch, in_flight: int, prefetch=None) -> Iterator:
    """``fetch(submit(item))`` for every item, in order, with at most ``in_flight`` items
    submitted and not yet fetched: while the consumer uses one result, the next
    ``in_flight - 1`` are being made. ``prefetch(pending)``, after each submit, may start
    moving the pending results closer (Ray: pull finished blocks from other nodes)."""
    if in_flight < 1:
        raise ValueError(f"in_flight: must be >= 1, got {in_flight}")
    pending = deque()
    for item in items:
        pending.append(submit(item))
        if prefetch is not None:
            prefetch(list(pending))
        if len(pending) >= in_flight:
            yield fetch(pending.popleft())
    while pending:
        yield fetch(pending.popleft())


def tasks_in_flight(cluster_cpus: float, object_store_bytes: float, world: int, block_bytes: int,
                    cpus_per_task: float = 1.0) -> int:
    """Decode tasks a training worker keeps submitted and not yet read (:func:`ordered_stream`).

    Twice the decode tasks its share of the cluster's CPUs runs at once (the share counts the
    training workers' own CPUs: an upper bound), so while the consumer uses one block the
    others' CPUs have a task queued behind the running one; at least 2 (one in use, one
    decoding). A finished block waits in the object store until it is read, so all workers'
    blocks in flight stay within a quarter of the store (Ray spills to disk beyond it; blocks
    the P×K window still holds come on top), but never fewer than 2. 8 against 4 on two
    cores: +3% median over 6 pairs, within their noise (docs/benchmarks.md).
    """
    running = max(1.0, cluster_cpus / max(world, 1) / cpus_per_task)
    by_cpu = int(2 * running)  # >= 2: running >= 1
    by_memory = int(object_store_bytes / 4 / max(world, 1) / max(block_bytes, 1))
    return max(2, min(by_cpu, by_memory))


def worker_stream(groups: list, cfg: TransformConfig, *, epochs: range, seed: int, rank: int, world: int,
                  train: bool = True, cpus_per_task: float = 1.0, rows_per_task: int = 1,
                  in_flight: int | None = None) -> Iterator[dict]:
    """This worker's decoded blocks for ``epochs``, epoch after epoch, each epoch in a
    reproducible order; every row carries its ``epoch`` (split them with :class:`EpochBlocks`).

    One Ray task per decode task (:func:`decode_tasks`), ``in_flight`` of them submitted ahead
    (default :func:`tasks_in_flight` of the cluster), fetched in submission order, the next
    epoch's first tasks decoding while this epoch's last blocks are used.

    Why plain Ray tasks, not a Ray Dataset: this stream has one operator and a fixed order,
    which is all Ray Data's streaming executor would schedule, and Ray Data's machinery around
    it cost the same tasks 5-31% of their decoded rows/s on two cores (median 11%, interleaved
    pairs; the consumer's iterator threads, and in each task the block's metadata, stats and a
    memory-polling thread), half the first epoch's rate (``from_items`` puts one object per task
    before the first block) and ~550 MiB; docs/benchmarks.md, "Data throughput". ``rows_per_task`` packs
    consecutive row groups into one task; it changes neither the rows, their order nor their
    augmentation, only the block boundaries, which :class:`PKStream` does not depend on.
    """
    import ray

    if not len(epochs):
        return iter(())
    # the first epoch's tasks now: a worker without row groups is refused here, not at its first block
    first = _epoch_tasks(groups, epochs[0], seed, rank, world, rows_per_task)
    later = (task for epoch in epochs[1:] for task in _epoch_tasks(groups, epoch, seed, rank, world, rows_per_task))
    items = itertools.chain(first, later)
    if in_flight is None:
        resources = ray.cluster_resources()
        largest = max((g.rows for g in groups), default=1)
        # a task packs groups until it holds rows_per_task rows: at most this many more
        block = (rows_per_task + largest - 1) * 3 * cfg.height * cfg.width
        in_flight = tasks_in_flight(resources.get("CPU", 1.0), resources.get("object_store_memory", 2**30), world,
                                    block, cpus_per_task)
    # retried as Ray Data retried its tasks: a decode process lost to the OOM killer or a node
    # going away is rerun, not a failed training attempt (a decode that raises is not retried)
    # (and scheduled by Ray's default policy, never inside a placement group of the caller's)
    decode = ray.remote(num_cpus=cpus_per_task, max_retries=-1, retry_exceptions=[ray.exceptions.RaySystemError],
                        scheduling_strategy="DEFAULT")(_decode_task)

    def pull_finished(pending: list) -> None:
        # start moving blocks decoded on other nodes here while earlier ones are used, as Ray
        # Data's iterator did; ray.get alone would pull each one only when it is asked for
        ray.wait(pending, num_returns=len(pending), timeout=0, fetch_local=True)

    return ordered_stream(items, lambda task: decode.remote(task, cfg, train), ray.get, in_flight, pull_finished)


def worker_epochs(groups: list, cfg: TransformConfig, *, epochs: range, seed: int, rank: int, world: int,
                  **kwargs) -> EpochBlocks:
    """This worker's decoded blocks for ``epochs`` (:func:`worker_stream`), split by epoch. No
    epochs: no blocks, and no task is submitted."""
    return EpochBlocks(worker_stream(groups, cfg, epochs=epochs, seed=seed, rank=rank, world=world, **kwargs))


def _epoch_tasks(groups: list, epoch: int, seed: int, rank: int, world: int, rows_per_task: int) -> list[dict]:
    mine = epoch_assignment(groups, epoch, seed, rank, world)
    if not mine:
        raise ValueError(f"worker {rank} of {world} has no row groups: the split has only {len(groups)}")
    tasks = decode_tasks([(g, _mix(seed, epoch, index) % (2**63)) for index, g in mine], rows_per_task)
    return [{**task, "epoch": epoch} for task in tasks]


class EpochBlocks:
    """Split the block stream of a several-epoch :func:`worker_stream` into one iterator per
    epoch, asked for in order. Blocks of an earlier epoch its consumer left unread are skipped."""

    def __init__(self, blocks: Iterable[dict]):
        self._blocks = iter(blocks)
        self._held: dict | None = None  # the first block of the next epoch, read ahead

    def epoch(self, epoch: int) -> Iterator[dict]:
        while True:
            block, self._held = self._held, None
            if block is None:
                block = next(self._blocks, None)
                if block is None:
                    return
            if not len(block["epoch"]):
                continue
            at = int(block["epoch"][0])
            if at > epoch:
                self._held = block
                return
            if at == epoch:
                yield block


def split_dataset(root: str | Path, split: str, cfg: TransformConfig, *, columns: tuple,
                  cpus_per_task: float = 1.0):
    """A split's rows decoded for inference (no augmentation; uint8 N×3×H×W ``image``), one Ray
    Data task per row group after the shards are checked against the manifest.

    Why row groups, not ``read_parquet``: Ray Data 2.60 read this split's ten 40 MB files as
    two blocks of 19,262 and 738 rows, so the decode and the model downstream saw one block
    at a time and nothing streamed (bench/embed_throughput.py: the first vector after 110 s,
    5.6 GiB). A row group (~512 rows) is a block of ~50 MB decoded.
    """
    import ray.data

    shards.verify_split(root, split)
    groups = row_groups(root, split)
    if not groups:
        raise FileNotFoundError(f"{root}: split {split!r} has no rows")
    items = decode_tasks([(g, 0) for g in groups], rows_per_task=1)
    # A task holds its row group's decoded pixels and the block it returns, in a worker process
    # that is ~130 MB before it reads anything (asking for less makes Ray Data warn the user at
    # every run). Asking for memory also keeps Ray Data from fusing these tasks into a downstream
    # CPU actor pool (fusion needs equal remote args): fused, as it did when both asked for 1 CPU,
    # each actor decoded its own input between model calls instead of beside them.
    memory = WORKER_BASE_MEMORY + 2 * max(g.rows for g in groups) * 3 * cfg.height * cfg.width
    ds = ray.data.from_items(items, override_num_blocks=len(items))
    return ds.map_batches(read_decode_row_groups, fn_kwargs={"cfg": cfg, "train": False, "columns": columns},
                          batch_size=1, batch_format="numpy", num_cpus=cpus_per_task, memory=memory)


class PKStream:
    """Turn a worker's stream of decoded row groups into P×K numpy batches, counting bad rows.

    Yields dicts ``image`` (P*K, 3, H, W) as decoded (uint8 from :func:`read_decode_row_groups`:
    the training step normalises on its device), ``label``, ``identity`` and ``row_id``
    (P*K,) int64, ``camera`` (P*K,) int64, ordered identity by identity.
    ``pad()`` gives extra batches from identities already seen, for a worker whose stream
    ran out before the others'.
    """

    def __init__(self, p: int, k: int, *, seed: int, window_identities: int | None = None, mode: str = "pk"):
        if mode not in ("pk", "hard", "random"):
            raise ValueError(f"sampler mode {mode!r} is not one of pk, hard, random")
        self.p, self.k, self.seed, self.mode = p, k, seed, mode
        self.window_identities = window_identities
        self.decode_errors = 0
        self.rows_seen = 0
        self.batcher: PKBatcher | RandomBatcher | None = None

    def epoch(self, batches: Iterable[dict], epoch: int, centres: np.ndarray | None = None) -> Iterator[dict]:
        """One epoch of batches. ``centres`` (classes × D, L2-normalised; "hard" mode) are the
        class centres that define which identities are close."""
        seed = _mix(self.seed, epoch) % (2**63)
        if self.mode == "random":
            window = (self.window_identities or 4 * self.p) * self.k
            self.batcher = RandomBatcher(self.p * self.k, window_rows=window, seed=seed)
        else:
            similarity = self._centre_similarity(centres) if self.mode == "hard" and centres is not None else None
            self.batcher = PKBatcher(self.p, self.k, window_identities=self.window_identities, seed=seed,
                                     similarity=similarity)
        for batch in batches:
            ok = batch["decode_ok"]
            self.rows_seen += len(ok)
            self.decode_errors += int((~ok).sum())
            cameras = batch["camera"] if "camera" in batch else np.full(len(ok), -1)
            for i in np.flatnonzero(ok):
                self.batcher.add(batch["identity"][i],
                                 (batch["image"][i], batch["label"][i], batch["row_id"][i], cameras[i]))
                # after every row, not every block: the batches then depend on the rows and
                # their order only, not on how decode tasks cut the stream into blocks
                for pk in self.batcher.ready():
                    yield self._stack(pk)
        for pk in self.batcher.flush():
            yield self._stack(pk)

    def _centre_similarity(self, centres: np.ndarray):
        def label(identity: int) -> int:
            rows = self.batcher.rows_of(identity)
            return int(rows[0][1])

        def similarity(anchor: int, identities: list[int]) -> np.ndarray:
            labels = np.fromiter((label(i) for i in identities), dtype=np.int64, count=len(identities))
            return np.asarray(centres[labels], dtype=np.float32) @ np.asarray(centres[label(anchor)], dtype=np.float32)

        return similarity

    def pad(self) -> dict:
        return self._stack(self.batcher.extra())

    def _stack(self, pk: list) -> dict:
        return {
            "image": np.stack([row[0] for _, row in pk]),
            "label": np.asarray([row[1] for _, row in pk], dtype=np.int64),
            "row_id": np.asarray([row[2] for _, row in pk], dtype=np.int64),
            "camera": np.asarray([row[3] for _, row in pk], dtype=np.int64),
            "identity": np.asarray([identity for identity, _ in pk], dtype=np.int64),
        }
