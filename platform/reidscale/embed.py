"""Batch embedding over Ray Data: shards → decode → an actor pool running the model → vectors.

Each actor loads the exported embedding model once (on a GPU when the actor has one)
and embeds batches; the driver collects the stream into embedding shards (Parquet:
row_id, identity, camera, path, embedding) with a progress bar. Rows whose image does
not decode are counted and left out.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reidscale.config import ConfigError
from reidscale.data import shards


@dataclass
class EmbedConfig:
    batch_size: int = 128
    # actors in the pool; each holds one copy of the model
    num_actors: int = 1
    # "auto": one GPU per actor when the cluster has GPUs
    use_gpu: Literal["auto", "true", "false"] = "auto"
    cpus_per_actor: float = 1.0
    rows_per_shard: int = 200_000

    def validate(self) -> None:
        if self.batch_size < 1 or self.num_actors < 1 or self.rows_per_shard < 1:
            raise ConfigError("batch_size, num_actors, rows_per_shard: must be >= 1")


class Embedder:
    """Ray Data callable class: decoded batch → embeddings (float32, L2-normalised)."""

    def __init__(self, model_dir: str, threads: int = 0):
        import torch

        from reidscale.models.reid import load_embedding_model

        if threads > 0:
            torch.set_num_threads(threads)
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.model, _ = load_embedding_model(model_dir)
        self.model.to(self.device)

    def __call__(self, batch: dict) -> dict:
        import torch

        with torch.inference_mode():
            images = torch.from_numpy(batch["image"]).to(self.device)
            emb = self.model(images).cpu().numpy().astype(np.float32)
        out = {k: v for k, v in batch.items() if k not in ("image",)}
        out["embedding"] = emb
        return out


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
                cfg: EmbedConfig) -> dict:
    """Embed one split into ``out_dir/embeddings-*.parquet``; return counts and throughput."""
    import ray
    import ray.data
    from tqdm import tqdm

    from reidscale.data.pipeline import decoded, read_split
    from reidscale.models.reid import load_embedding_model
    from reidscale.train.trainer import init_ray

    model_dir, out_dir = Path(model_dir), Path(out_dir)
    _, model_config = load_embedding_model(model_dir)  # fail here, not inside an actor
    dim = int(model_config["dim"])
    total = shards.read_manifest(data_dir)["splits"][split]["images"]
    init_ray()
    use_gpu = cfg.use_gpu == "true" or (cfg.use_gpu == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
    # the tqdm bar below reports progress; Ray Data's own bars only add noise to job logs
    ray.data.DataContext.get_current().enable_progress_bars = False
    ds = decoded(read_split(data_dir, split), model_config["transform_config"], train=False, batch_size=cfg.batch_size)
    ds = ds.map_batches(
        Embedder,
        fn_constructor_kwargs={"model_dir": str(model_dir), "threads": max(1, int(cfg.cpus_per_actor))},
        batch_size=cfg.batch_size,
        compute=ray.data.ActorPoolStrategy(size=cfg.num_actors),
        num_gpus=1 if use_gpu else 0,
        num_cpus=cfg.cpus_per_actor,
        batch_format="numpy",
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    schema = embedding_schema(dim)
    written, failed, files = 0, 0, []
    pending: list[pa.Table] = []
    pending_rows = 0

    def flush() -> None:
        nonlocal pending, pending_rows
        if not pending:
            return
        path = out_dir / f"embeddings-{len(files):05d}.parquet"
        tmp = path.with_name(f".{path.name}.tmp")
        pq.write_table(pa.concat_tables(pending), tmp)
        tmp.replace(path)
        files.append(path.name)
        pending, pending_rows = [], 0

    t0 = time.time()
    with tqdm(total=total, desc=f"embed {split}", unit="img", mininterval=2.0) as bar:
        for batch in ds.iter_batches(batch_size=None, batch_format="numpy"):
            ok = batch["decode_ok"]
            failed += int((~ok).sum())
            emb = batch["embedding"][ok]
            table = pa.table(
                {
                    "row_id": batch["row_id"][ok].astype(np.int64),
                    "identity": batch["identity"][ok].astype(np.int64),
                    "camera": batch["camera"][ok].astype(np.int32),
                    "path": batch["path"][ok].astype(str),
                    "embedding": pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), pa.float32()), dim),
                },
                schema=schema,
            )
            pending.append(table)
            pending_rows += len(table)
            written += len(table)
            bar.update(len(ok))
            if pending_rows >= cfg.rows_per_shard:
                flush()
        flush()
    wall = time.time() - t0
    return {
        "split": split,
        "embedded": written,
        "decode_errors": failed,
        "dim": dim,
        "files": files,
        "wall_time_s": wall,
        "images_per_s": written / max(wall, 1e-9),
        "images_per_s_per_actor": written / max(wall, 1e-9) / cfg.num_actors,
        "model_sha256": model_config["weights_sha256"],
    }


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
