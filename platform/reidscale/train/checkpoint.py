"""Training checkpoints that are either complete or refused.

A checkpoint directory holds DeepSpeed's files from every rank plus:

- ``rank-<r>.json`` written by rank r after its DeepSpeed files: each file's size and sha256;
- ``reidscale_state.json`` written by rank 0: world size, epoch, step in epoch, global step,
  steps per epoch, and the sampler's position (which is a function of these).

``verify_complete`` accepts a directory only when the state names a world size and every
rank's listing is present and matches the files. Ray Train copies each rank's directory into
storage in no particular order, so a crash mid-copy leaves a listing without its files or
files without their listing; both are refused. Loading never unpickles: DeepSpeed's reader
is switched to ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import json
from pathlib import Path

from reidscale.atomic import sha256_file, write_json

STATE_FILE = "reidscale_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete, tampered with, or does not fit this run."""


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("rank-") and p.name != STATE_FILE)


def write_rank_listing(directory: str | Path, rank: int) -> None:
    root = Path(directory)
    listing = {str(p.relative_to(root)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)} for p in _files(root)}
    write_json(root / f"rank-{rank}.json", {"rank": rank, "files": listing})


def write_state(directory: str | Path, state: dict) -> None:
    write_json(Path(directory) / STATE_FILE, state)


def verify_complete(directory: str | Path) -> dict:
    """Return the state of a complete checkpoint; raise CheckpointError naming what is wrong."""
    root = Path(directory)
    state_path = root / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"{root}: no {STATE_FILE}; the checkpoint was never completed")
    state = json.loads(state_path.read_text())
    for rank in range(int(state["world_size"])):
        listing_path = root / f"rank-{rank}.json"
        if not listing_path.is_file():
            raise CheckpointError(f"{root}: rank {rank} never finished writing ({listing_path.name} missing)")
        for name, meta in json.loads(listing_path.read_text())["files"].items():
            path = root / name
            if not path.is_file():
                raise CheckpointError(f"{root}: {name} (rank {rank}) is missing")
            if path.stat().st_size != meta["bytes"] or sha256_file(path) != meta["sha256"]:
                raise CheckpointError(f"{root}: {name} (rank {rank}) does not match its sha256; refusing to load")
    return state


def verified_file(directory: str | Path, name: str, rank: int = 0) -> Path | None:
    """``directory/name`` if rank ``rank`` listed it and it matches its sha256; None if not listed.

    For a file needed before the whole checkpoint is verified and loaded (CLIP-ReID's text
    features, read before the stage-2 engine exists).
    """
    root = Path(directory)
    listing_path = root / f"rank-{rank}.json"
    meta = json.loads(listing_path.read_text())["files"].get(name) if listing_path.is_file() else None
    if meta is None:
        return None
    path = root / name
    if not path.is_file() or path.stat().st_size != meta["bytes"] or sha256_file(path) != meta["sha256"]:
        raise CheckpointError(f"{root}: {name} (rank {rank}) is missing or does not match its sha256; refusing to load")
    return path


def use_safe_loading(engine) -> None:
    """Make DeepSpeed read checkpoint files with ``weights_only=True`` (no unpickling)."""
    import torch
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    # DeepSpeed's ZeRO optimizer state holds these plain state objects; allow exactly them.
    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]

    def load(path: str, map_location=None):
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    engine.checkpoint_engine.load = load
