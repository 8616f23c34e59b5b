"""Batch embedding over Ray Data: shards → decode → an actor pool running the model → vectors.

Each actor loads the exported embedding model once (on a GPU when the actor has one)
and embeds batches; the driver collects the stream into embedding shards (Parquet:
row_id, identity, camera, path, embedding) with a progress bar, and reports throughput
per actor (images over the seconds that actor spent in the model). Rows whose image does
not decode are counted and left out. ``embeddings.json``, written last, marks a finished
split so a re-run can skip it.

``embed_images`` / ``embed_split_in_process`` do the same in the calling process, without
Ray, for a handful of query images or a small query split.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reidscale import atomic
from reidscale.config import ConfigError
from reidscale.data import shards
from reidscale.models import exported

log = logging.getLogger(__name__)

EMBEDDINGS_MANIFEST = "embeddings.json"
# what the embedding shards keep of each row, beside the vector
EMBED_COLUMNS = ("image", "row_id", "identity", "camera", "path")


@dataclass
class EmbedConfig:
    batch_size: int = 128
    # actors in the pool; each holds one copy of the model
    num_actors: int = 1
    # "auto": one GPU per actor when the cluster has GPUs
    use_gpu: Literal["auto", "true", "false"] = "auto"
    cpus_per_actor: float = 1.0
    # torch threads of a CPU actor; 0: the cluster's CPUs divided among the actors (actor_threads)
    torch_threads: int = 0
    # CPUs Ray reserves per decode task (one task per row group)
    cpus_per_decode_task: float = 1.0
    rows_per_shard: int = 200_000

    def validate(self) -> None:
        if self.batch_size < 1 or self.num_actors < 1 or self.rows_per_shard < 1:
            raise ConfigError("batch_size, num_actors, rows_per_shard: must be >= 1")
        if self.torch_threads < 0 or self.cpus_per_decode_task <= 0:
            raise ConfigError("torch_threads: must be >= 0 (0: automatic); cpus_per_decode_task: must be > 0")


class Embedder:
    """Ray Data callable class: decoded batch → embeddings (float32, L2-normalised)."""

    def __init__(self, model_dir: str, threads: int = 0):
        import torch

        from reidscale.models.reid import load_embedding_model

        if threads > 0:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, config = load_embedding_model(model_dir)
        self.model.to(self.device)
        self.transform = config["transform_config"]
        self.actor = f"{socket.gethostname()}:{os.getpid()}"

    def __call__(self, batch: dict) -> dict:
        from reidscale.models.inference import embed_batch

        t0 = time.perf_counter()
        # uint8 from the decode tasks, normalised on this actor's device; SIE: each camera
        emb = embed_batch(self.model, batch["image"], batch.get("camera"), transform=self.transform, device=self.device)
        seconds = time.perf_counter() - t0
        out = {k: v for k, v in batch.items() if k not in ("image",)}
        out["embedding"] = emb
        # per-row share of this batch's model time, so the driver can sum busy time per actor
        out["actor"] = np.full(len(emb), self.actor)
        out["model_s"] = np.full(len(emb), seconds / max(len(emb), 1))
        return out


def actor_cpus(cfg: EmbedConfig, cluster_cpus: float, use_gpu: bool) -> float:
    """CPUs to reserve per CPU actor, leaving one CPU for the Parquet read tasks.

    A pool that reserves every CPU starves Ray Data's read tasks and the job never
    starts (2 actors × 1 CPU on a 2-core machine hangs); GPU actors are not capped.
    """
    if use_gpu or cfg.num_actors * cfg.cpus_per_actor <= cluster_cpus - 1:
        return cfg.cpus_per_actor
    capped = max(0.25, (cluster_cpus - 1) / cfg.num_actors)
    log.warning(f"embed: {cfg.num_actors} actors × {cfg.cpus_per_actor} CPU would leave no CPU of {cluster_cpus:g} "
                f"for reading; reserving {capped:.2f} CPU per actor")
    return capped


def actor_threads(cfg: EmbedConfig, cluster_cpus: float, use_gpu: bool) -> int:
    """torch threads per actor: ``cfg.torch_threads``, or (0) the cluster's CPUs shared among the
    CPU actors. More than the actor reserves: its reservation leaves room for the decode tasks
    to be scheduled, but they use a fraction of a core per actor's worth of images (0.3 ms per
    256×128 image against a ViT's several), so a one-thread model would leave a core idle."""
    if cfg.torch_threads > 0:
        return cfg.torch_threads
    if use_gpu:
        return max(1, int(cfg.cpus_per_actor))
    return max(1, int(cluster_cpus // cfg.num_actors))


def embedding_schema(dim: int) -> pa.Schema:
    return pa.schema(
        [
            pa.field("row_id", pa.int64()),
            pa.field("identity", pa.int64()),
            pa.field("camera", pa.int32()),
            pa.field("path", pa.string()),
            pa.field("embedding", pa.list_(pa.float32(), dim)),
        ]
    )


def embed_split(model_dir: str | Path, data_dir: str | Path, split: str, out_dir: str | Path,
                cfg: EmbedConfig, job_name: str = "", on_batch: Callable[[int], None] | None = None) -> dict:
    """Embed one split into ``out_dir/embeddings-*.parquet``; return counts and throughput.

    ``on_batch(rows done so far)`` is called after each batch is written (progress beyond the
    bar, e.g. bench/embed_throughput.py's start-up and rate).

    The result (also written to ``out_dir/embeddings.json``, last) has ``files``,
    ``images_per_s`` over the wall time, and ``per_actor``: images and images/s of model
    time for each actor of the pool.
    """
    from reidscale.models.reid import load_embedding_model
    from reidscale.progress import progress_bar

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    _, model_config = load_embedding_model(model_dir)  # fail here, not inside an actor
    dim = int(model_config["dim"])
    total = shards.read_manifest(data_dir)["splits"][split]["images"]
    ds = _embedding_dataset(model_dir, model_config, data_dir, split, cfg, job_name)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / EMBEDDINGS_MANIFEST).unlink(missing_ok=True)
    for stale in out_dir.glob("embeddings-*.parquet"):  # a previous run's shards, maybe more of them
        stale.unlink()
    writer = _ShardWriter(out_dir, embedding_schema(dim), cfg.rows_per_shard)
    per_actor: dict[str, list[float]] = {}
    failed = 0
    t0 = time.time()
    with progress_bar(total, f"embed {split}", "img") as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            ok = batch["decode_ok"]
            failed += int((~ok).sum())
            _count_actor_time(per_actor, batch, ok)
            writer.add(_embedding_rows(batch, ok, writer.schema, dim))
            bar.update(len(ok))
            if on_batch is not None:
                on_batch(bar.n)
        writer.flush()
    wall = time.time() - t0
    actors = [{"actor": a, "images": int(n), "model_s": round(sec, 3), "images_per_s": n / max(sec, 1e-9)}
              for a, (n, sec) in sorted(per_actor.items())]
    for a in actors:
        log.info(f"embed {split}: actor {a['actor']}: {a['images']} images, {a['images_per_s']:.1f} img/s in the model")
    stats = {
        "split": split,
        "embedded": writer.rows,
        "decode_errors": failed,
        "dim": dim,
        "files": writer.files,
        "file_sha256": {f: atomic.sha256_file(out_dir / f) for f in writer.files},
        "wall_time_s": wall,
        "images_per_s": writer.rows / max(wall, 1e-9),
        "images_per_s_per_actor": writer.rows / max(wall, 1e-9) / max(len(actors), 1),
        "per_actor": actors,
        "model_sha256": model_config["weights_sha256"],
        "data_sha256": split_fingerprint(data_dir, split),
    }
    atomic.write_json(out_dir / EMBEDDINGS_MANIFEST, stats)
    return stats


def _embedding_dataset(model_dir: Path, model_config: dict, data_dir: str | Path, split: str, cfg: EmbedConfig,
                       job_name: str):
    """The Ray layer: the split's decoded batches through an actor pool of ``Embedder``s."""
    import ray
    import ray.data

    from reidscale.data.pipeline import split_dataset
    from reidscale.ray_runtime import init_ray, ray_cluster_cpus, resolve_use_gpu

    init_ray(job_name=job_name)
    use_gpu = resolve_use_gpu(cfg.use_gpu)
    cluster_cpus = ray_cluster_cpus()
    cpus_per_actor = actor_cpus(cfg, cluster_cpus, use_gpu)
    # the caller's tqdm bar reports progress; Ray Data's own bars only add noise to job logs
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = split_dataset(data_dir, split, model_config["transform_config"], columns=EMBED_COLUMNS,
                       cpus_per_task=cfg.cpus_per_decode_task)
    return ds.map_batches(
        Embedder,
        fn_constructor_kwargs={"model_dir": str(model_dir), "threads": actor_threads(cfg, cluster_cpus, use_gpu)},
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        num_gpus=1 if use_gpu else 0,
        num_cpus=cpus_per_actor,
        batch_format="numpy",
    )


def _count_actor_time(per_actor: dict[str, list[float]], batch: dict, ok: np.ndarray) -> None:
    """Images embedded and model seconds per actor (the pool's balance, in the job summary)."""
    for actor in np.unique(batch["actor"]):
        mine = batch["actor"] == actor
        stats = per_actor.setdefault(str(actor), [0, 0.0])
        stats[0] += int((mine & ok).sum())
        stats[1] += float(batch["model_s"][mine].sum())


def _embedding_rows(batch: dict, ok: np.ndarray, schema: pa.Schema, dim: int) -> pa.Table:
    """The rows of ``batch`` that decoded, as an embedding-shard table."""
    emb = batch["embedding"][ok]
    return pa.table(
        {
            "row_id": batch["row_id"][ok].astype(np.int64),
            "identity": batch["identity"][ok].astype(np.int64),
            "camera": batch["camera"][ok].astype(np.int32),
            "path": batch["path"][ok].astype(str),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), dim),
        },
        schema=schema,
    )


class _ShardWriter:
    """Embedding rows into ``embeddings-NNNNN.parquet`` files of about ``rows_per_shard`` rows,
    each written atomically, so a reader never sees a half-written shard."""

    def __init__(self, out_dir: Path, schema: pa.Schema, rows_per_shard: int):
        self.out_dir, self.schema, self.rows_per_shard = out_dir, schema, rows_per_shard
        self.files: list[str] = []
        self.rows = 0
        self._pending: list[pa.Table] = []
        self._pending_rows = 0

    def add(self, table: pa.Table) -> None:
        self._pending.append(table)
        self._pending_rows += len(table)
        self.rows += len(table)
        if self._pending_rows >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        if not self._pending:
            return
        path = self.out_dir / f"embeddings-{len(self.files):05d}.parquet"
        table = pa.concat_tables(self._pending)
        atomic.write_file(path, lambda tmp: pq.write_table(table, tmp))
        self.files.append(path.name)
        self._pending, self._pending_rows = [], 0


def split_fingerprint(data_dir: str | Path, split: str) -> str:
    """sha256 over the split's shard checksums in the dataset manifest: changes when the data does."""
    entries = shards.read_manifest(data_dir)["splits"][split]["shards"]
    return hashlib.sha256(json.dumps([[e["file"], e["sha256"]] for e in entries]).encode()).hexdigest()


def finished_embeddings(out_dir: str | Path, model_sha256: str, data_dir: str | Path, split: str) -> dict | None:
    """The stats of a finished ``embed_split`` of the same model and data in ``out_dir``, else None."""
    path = Path(out_dir) / EMBEDDINGS_MANIFEST
    if not path.is_file():
        return None
    stats = json.loads(path.read_text())
    if stats.get("model_sha256") != model_sha256 or stats.get("data_sha256") != split_fingerprint(data_dir, split):
        return None
    for name, sha in stats.get("file_sha256", {}).items():
        if not (Path(out_dir) / name).is_file() or atomic.sha256_file(Path(out_dir) / name) != sha:
            return None
    return stats


@functools.lru_cache(maxsize=2)
def _cached_model(model_dir: str, weights_sha256: str):
    from reidscale.models.reid import load_embedding_model

    return load_embedding_model(model_dir)


def load_model(model_dir: str | Path):
    """(model, config) of an export, loaded once per process (keyed by path and weights hash)."""
    return _cached_model(str(Path(model_dir).resolve()), exported.model_sha(model_dir))


def embed_images(model_dir: str | Path, images, batch_size: int = 128,
                 cameras=None) -> tuple[np.ndarray, np.ndarray]:
    """Embed images in this process: (N×D float32 L2-normalised, ok N bool).

    ``images`` are file paths or encoded bytes. Rows that do not decode (or whose file
    cannot be read) get a zero vector and ``ok`` False. ``cameras`` (N ints) are each
    image's camera id, needed by a model trained with SIE (``model.sie_cameras``), which
    refuses to embed without them rather than silently dropping its camera embedding.
    """
    from reidscale.models.inference import embed_encoded

    model, config = load_model(model_dir)
    raw = []
    for item in images:
        if isinstance(item, (bytes, bytearray)):
            raw.append(bytes(item))
        else:
            try:
                raw.append(Path(item).read_bytes())
            except OSError:
                raw.append(b"")
    vectors, ok = embed_encoded(model, config["transform_config"], raw,
                                None if cameras is None else np.asarray(cameras), batch_size=batch_size)
    vectors[~ok] = 0.0
    return vectors, ok


def embed_split_in_process(model_dir: str | Path, data_dir: str | Path, split: str,
                           batch_size: int = 128) -> tuple[np.ndarray, pa.Table]:
    """(N×D vectors, metadata row_id/identity/camera/path) of one split, embedded without Ray.

    For small splits (a query set); rows that do not decode are left out.
    """
    vectors, tables = [], []
    for path in shards.verify_split(data_dir, split):
        for group in pq.ParquetFile(path).iter_batches(batch_size=1024,
                                                       columns=["image", "row_id", "identity", "camera", "path"]):
            table = pa.Table.from_batches([group])
            emb, ok = embed_images(model_dir, table.column("image").to_pylist(), batch_size,
                                   cameras=table.column("camera").to_numpy())
            vectors.append(emb[ok])
            tables.append(table.drop(["image"]).filter(pa.array(ok)))
    if not tables:
        raise FileNotFoundError(f"{data_dir}: split {split!r} has no rows")
    return np.concatenate(vectors), pa.concat_tables(tables)


def read_embeddings(out_dir: str | Path, files: list[str] | None = None) -> tuple[np.ndarray, pa.Table]:
    """(N×D float32 vectors, metadata table without vectors) from embedding shards."""
    out_dir = Path(out_dir)
    paths = [out_dir / f for f in files] if files else sorted(out_dir.glob("embeddings-*.parquet"))
    if not paths:
        raise FileNotFoundError(f"{out_dir}: no embedding shards")
    table = pa.concat_tables([pq.read_table(p) for p in paths])
    col = table.column("embedding").combine_chunks()
    dim = col.type.list_size
    vectors = col.values.to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)
    return vectors, table.drop(["embedding"])
