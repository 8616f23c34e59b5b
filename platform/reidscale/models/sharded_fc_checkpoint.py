"""Checkpoints of the sharded Partial FC head as one logical table, loadable with any rank count.

Layout in a checkpoint directory (what ``save_sharded_fc`` writes)::

    sharded_fc-<lo>-<hi>.safetensors   one per saving rank: rows [lo, hi) of the centres
                                       ("weight") and of every per-row optimizer state
                                       (AdamW "exp_avg"/"exp_avg_sq", SGD "momentum_buffer")
    sharded_fc.json                    the index, written by rank 0 last: identities, dim,
                                       optimizer class and its scalar state ("step"), and
                                       each file's range and sha256

Each rank writes only its own file (atomically) and computes its sha256 from the bytes in
memory, so ranks need no shared filesystem (Ray Train merges per-rank checkpoint directories);
rank 0 writes the index from the gathered listings. ``save_rows`` / ``read_index`` /
``load_rows`` are the layout for any per-identity table (CLIP-ReID's sharded text features use
them too: ``models/sharded_prompts.py``). ``load_sharded_fc`` on rank k of M reads
the rows ``shard_range(C, k, M)`` from whichever files hold them (safetensors slices: only the
needed rows are read), after checking the index, the coverage of [0, C) and the files'
sha256. A checkpoint with a missing or damaged part is refused with one line naming it, so an
interrupted save is never half-loaded (insightface#2027: per-rank Partial FC files that only
resume on the same GPU count).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors import safe_open
from safetensors.torch import save as safetensors_bytes

from reidscale.atomic import write_bytes, write_json
from reidscale.models.sharded_fc import ShardedPartialFC

log = logging.getLogger(__name__)

INDEX_FILE = "sharded_fc.json"
FORMAT = "reidscale-sharded-fc-v1"


def _distributed(group=None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def _row_states(head: ShardedPartialFC, optimizer: torch.optim.Optimizer | None) -> tuple[dict, dict]:
    """(per-row tensors, scalar state) of ``head.weight`` in ``optimizer`` (empty before its first step)."""
    rows, scalars = {}, {}
    state = optimizer.state.get(head.weight, {}) if optimizer is not None else {}
    for name, value in state.items():
        if torch.is_tensor(value) and value.dim() >= 1:
            if value.shape[0] != head.num_local:
                raise ValueError(f"optimizer state {name!r}: {tuple(value.shape)} is not per row of the shard")
            rows[name] = value.detach().float().cpu().contiguous()
        elif value is not None:
            scalars[name] = float(value)
    return rows, scalars


def save_rows(directory: str | Path, stem: str, fmt: str, num_classes: int, lo: int, hi: int,
              tensors: dict[str, torch.Tensor], meta: dict, group=None) -> Path:
    """One logical table of ``num_classes`` rows, this rank's ``[lo, hi)`` of each tensor in
    ``tensors``: ``<stem>-<lo>-<hi>.safetensors`` per rank, ``<stem>.json`` (rank 0, last) with
    ``meta`` (equal on every rank), the ranges and sha256s. A collective; returns the index path."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for n, t in tensors.items():
        if t.shape[0] != hi - lo:
            raise ValueError(f"{stem} save: {n!r} has {t.shape[0]} rows, the range [{lo}, {hi}) has {hi - lo}")
    data = safetensors_bytes({n: t.detach().float().cpu().contiguous() for n, t in tensors.items()})
    name = f"{stem}-{lo:010d}-{hi:010d}.safetensors"
    write_bytes(directory / name, data)
    listing = {"file": name, "lo": lo, "hi": hi, "sha256": hashlib.sha256(data).hexdigest(), "meta": meta}
    listings = [listing]
    if _distributed(group):
        listings = [None] * dist.get_world_size(group)
        dist.all_gather_object(listings, listing, group=group)  # also: every file is written
    rank = dist.get_rank(group) if _distributed(group) else 0
    index = directory / f"{stem}.json"
    if rank == 0:
        metas = {json.dumps(x["meta"], sort_keys=True) for x in listings}
        if len(metas) != 1:
            raise RuntimeError(f"{stem} save: ranks disagree on the table's metadata {metas}")
        write_json(index, {
            "format": fmt, "num_classes": num_classes, **listings[0]["meta"], "saved_by_ranks": len(listings),
            "shards": [{k: x[k] for k in ("file", "lo", "hi", "sha256")} for x in sorted(listings, key=lambda x: x["lo"])],
        })
    if _distributed(group):
        dist.barrier(group=group)  # nobody reports the checkpoint before its index exists
    return index


def save_sharded_fc(head: ShardedPartialFC, optimizer: torch.optim.Optimizer | None, directory: str | Path,
                    group=None) -> Path:
    """Every rank calls this (a collective); returns the index path (written by rank 0)."""
    rows, scalars = _row_states(head, optimizer)
    meta = {"dim": head.dim, "optimizer": type(optimizer).__name__ if optimizer is not None else None,
            "optimizer_scalars": scalars, "row_states": sorted(rows)}
    return save_rows(directory, Path(INDEX_FILE).stem, FORMAT, head.num_classes, head.lo, head.hi,
                     {"weight": head.weight, **rows}, meta, group)


def read_index(directory: str | Path, index_file: str = INDEX_FILE, fmt: str = FORMAT) -> dict:
    """The index, checked: format, contiguous shards covering [0, num_classes)."""
    path = Path(directory) / index_file
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no index (incomplete, or not a checkpoint of this table)")
    index = json.loads(path.read_text())
    if index.get("format") != fmt:
        raise ValueError(f"{path}: format {index.get('format')!r}, expected {fmt!r}")
    end = 0
    for shard in index["shards"]:
        if shard["lo"] != end or shard["hi"] <= shard["lo"]:
            raise ValueError(f"{path}: shard {shard['file']} covers [{shard['lo']}, {shard['hi']}), expected to start at {end}")
        end = shard["hi"]
    if end != index["num_classes"]:
        raise ValueError(f"{path}: shards cover [0, {end}) of {index['num_classes']} identities")
    return index


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 24):
            digest.update(block)
    return digest.hexdigest()


def load_rows(directory: str | Path, index: dict, lo: int, hi: int, names: list[str],
              index_file: str = INDEX_FILE) -> dict[str, torch.Tensor]:
    """Rows ``[lo, hi)`` of each of ``names`` from the files of a checked ``index`` (only the
    needed rows are read), each file's sha256 checked first. Not a collective."""
    directory = Path(directory)
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for shard in index["shards"]:
        a, b = max(shard["lo"], lo), min(shard["hi"], hi)
        if a >= b:
            continue
        path = directory / shard["file"]
        if not path.is_file():
            raise FileNotFoundError(f"{path}: listed in {index_file} but missing")
        if _sha256(path) != shard["sha256"]:
            raise ValueError(f"{path}: sha256 differs from {index_file} (damaged or partly written)")
        with safe_open(str(path), framework="pt") as fh:
            for n in names:
                parts[n].append(fh.get_slice(n)[a - shard["lo"]:b - shard["lo"]])
    return {n: torch.cat(p) for n, p in parts.items()}


def load_sharded_fc(head: ShardedPartialFC, optimizer: torch.optim.Optimizer | None, directory: str | Path) -> dict:
    """Fill ``head`` (this rank's rows, any rank count) and ``optimizer``'s state for its weight
    from a checkpoint directory; returns the index. Not a collective."""
    directory = Path(directory)
    index = read_index(directory)
    where = directory / INDEX_FILE
    if index["num_classes"] != head.num_classes or index["dim"] != head.dim:
        raise ValueError(f"{where}: a table of {index['num_classes']} identities x {index['dim']}, this head has "
                         f"{head.num_classes} x {head.dim}")
    wanted = type(optimizer).__name__ if optimizer is not None else None
    if optimizer is not None and index["optimizer"] not in (None, wanted):
        raise ValueError(f"{where}: optimizer state of {index['optimizer']}, this run uses {wanted}")
    names = ["weight"] + (index["row_states"] if optimizer is not None else [])
    tables = load_rows(directory, index, head.lo, head.hi, names)
    with torch.no_grad():
        head.weight.copy_(tables.pop("weight").to(head.weight.dtype))
    if optimizer is not None and index["optimizer"] is not None:
        # the tensors torch's optimizers keep ('step' is a 0-d float32 tensor in Adam/AdamW)
        state = {k: torch.tensor(v, dtype=torch.float32) for k, v in index["optimizer_scalars"].items()}
        state.update({k: v.to(head.weight.device, head.weight.dtype) for k, v in tables.items()})
        optimizer.state[head.weight] = state
    log.info(f"loaded identities [{head.lo}, {head.hi}) from {directory} (saved by {index['saved_by_ranks']} ranks)")
    return index
