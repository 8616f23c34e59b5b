"""Rank-1/mAP on a held-out query/gallery split inside the training job, split across workers."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch.distributed as dist

from reidscale.data import shards
from reidscale.data.transforms import TransformConfig
# metrics, not the package: reidscale.evaluate also loads matplotlib for its plots
from reidscale.evaluate.metrics import evaluate_reid
from reidscale.models.inference import embed_encoded


def _embed_part(model, table: pa.Table, cfg: TransformConfig, device, dtype, batch_size: int) -> np.ndarray:
    """Embeddings of ``table``'s images; an SIE model also gets each image's camera, as in
    training and in TransReID's test protocol (the query's own camera)."""
    if not len(table):
        return np.zeros((0, 0), np.float32)
    # no_grad, not inference mode: this model goes back to training after validation
    vectors, _ = embed_encoded(model, cfg, table.column("image").to_numpy(zero_copy_only=False),
                               table.column("camera").to_numpy(), batch_size=batch_size, device=device, dtype=dtype,
                               inference_mode=False)
    return vectors


def embed_split_distributed(model, data_dir: str, split: str, cfg: TransformConfig, *, rank: int, world: int,
                            device, dtype, batch_size: int = 128):
    """Every rank embeds rows rank::world; rank 0 gets (vectors, identities, cameras) of the whole split."""
    table = pa.concat_tables(
        [pq.read_table(f, columns=["image", "identity", "camera", "row_id"]) for f in shards.verify_split(data_dir, split)]
    )
    mine = table.take(np.arange(rank, len(table), world))
    part = (_embed_part(model, mine, cfg, device, dtype, batch_size),
            mine.column("identity").to_numpy(), mine.column("camera").to_numpy(), mine.column("row_id").to_numpy())
    parts = [None] * world
    if world > 1:
        dist.all_gather_object(parts, part)
    else:
        parts = [part]
    if rank != 0:
        return None
    parts = [p for p in parts if len(p[1])]
    vectors = np.concatenate([p[0] for p in parts])
    ids = np.concatenate([p[1] for p in parts])
    cams = np.concatenate([p[2] for p in parts])
    order = np.argsort(np.concatenate([p[3] for p in parts]), kind="stable")
    return vectors[order], ids[order], cams[order]


def validate(model, data_dir: str, cfg: TransformConfig, *, rank: int, world: int, device, dtype) -> dict | None:
    """{'rank1', 'mAP', 'mINP'} on rank 0 (None elsewhere); every rank must call it."""
    query = embed_split_distributed(model, data_dir, "query", cfg, rank=rank, world=world, device=device, dtype=dtype)
    gallery = embed_split_distributed(model, data_dir, "gallery", cfg, rank=rank, world=world, device=device, dtype=dtype)
    if rank != 0:
        return None
    result = evaluate_reid(query[0], gallery[0], query[1], gallery[1], query[2], gallery[2], metric="cosine")
    return {"rank1": float(result["cmc"][0]), "mAP": float(result["mAP"]), "mINP": float(result["mINP"])}
