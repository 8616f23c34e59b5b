"""CLIP-ReID's per-identity prompts and stage-1 text features, sharded by identity range.

Rank k of W holds only the prompt tokens of identities ``shard_range(C, k, W)`` (the ranges
of ``sharded_fc.ShardedPartialFC``), their optimizer state (``prompt_optimizer``: outside any
DeepSpeed engine, never all-reduced, since two ranks' rows are different identities) and,
after stage 1, only the text features of that range (``range_text_features``). The losses
that read them across ranks are in ``losses/sharded_image_text.py``.

The stage-1 text features are saved as one logical table (``save_text_feature_rows``: the
per-range safetensors + sha256 index of ``sharded_fc_checkpoint``), so a run saved with W
workers loads with any M (``load_text_feature_rows``), complete or refused.

Memory per rank: prompts ``C/W × n_ctx × D_tok`` (+ gradient + 2 Adam states), text features
``C/W × D``; counted by ``bench/partial_fc_memory.py`` (``--layouts prompts``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from reidscale.models.prompt_learner import PromptLearner
from reidscale.models.sharded_fc import distributed, init_rows, shard_range
from reidscale.models.sharded_fc_checkpoint import load_rows, read_index, save_rows

log = logging.getLogger(__name__)

TEXT_FEATURES_STEM = "text_features"
TEXT_FEATURES_FORMAT = "reidscale-sharded-text-features-v1"
PROMPT_INIT_STD = 0.02  # CLIP-ReID's N(0, 0.02²)


def initial_contexts(lo: int, hi: int, n_ctx: int, dim: int, seed: int) -> torch.Tensor:
    """Prompt tokens of identities ``[lo, hi)`` at initialisation, [hi-lo, n_ctx, dim]: drawn
    per block of identities (``init_rows``), so identity c starts from the same tokens whatever
    rank holds it, and a 2-rank run starts where a 1-rank run does."""
    rows = init_rows(lo, hi, n_ctx * dim, seed) * (PROMPT_INIT_STD / 0.01)  # init_rows draws N(0, 0.01²)
    return rows.view(hi - lo, n_ctx, dim)


class ShardedPromptLearner(PromptLearner):
    """This rank's identity range ``[lo, hi)`` of "A photo of a X X X X <noun>." prompts.

    ``forward(labels)`` takes *global* identity ids, all in ``[lo, hi)``; ``ctx`` has
    ``hi - lo`` rows (row i is identity ``lo + i``). With ``rank=0, world=1`` it is the whole
    table, initialised as every sharded layout is.
    """

    def __init__(self, num_classes: int, token_embedding: nn.Embedding, *, n_ctx: int = 4, noun: str = "person",
                 seed: int = 0, rank: int | None = None, world: int | None = None, group=None):
        if rank is None or world is None:
            rank, world = (dist.get_rank(group), dist.get_world_size(group)) if distributed(group) else (0, 1)
        if num_classes < world:
            raise ValueError(f"num_classes: {num_classes} identities cannot be sharded over {world} ranks")
        lo, hi = shard_range(num_classes, rank, world)
        super().__init__(hi - lo, token_embedding, n_ctx=n_ctx, noun=noun)
        self.num_classes, self.lo, self.hi, self.rank, self.world = num_classes, lo, hi, rank, world
        with torch.no_grad():
            self.ctx.copy_(initial_contexts(lo, hi, n_ctx, self.ctx.shape[-1], seed))

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if labels.numel() and (int(labels.min()) < self.lo or int(labels.max()) >= self.hi):
            raise ValueError(f"sharded prompts: labels {int(labels.min())}..{int(labels.max())} are not all in this "
                             f"rank's identities [{self.lo}, {self.hi})")
        return super().forward(labels - self.lo)


def prompt_optimizer(prompts: PromptLearner, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """Stage 1's Adam over the prompt rows a learner holds (this rank's only, when sharded); the
    replicated path hands the same optimizer to DeepSpeed (``train/clipreid._stage1_engine``)."""
    return torch.optim.Adam([prompts.ctx], lr=lr, weight_decay=weight_decay)


@torch.no_grad()
def range_text_features(stage1: nn.Module, lo: int, hi: int, chunk: int = 256) -> torch.Tensor:
    """Text features of identities ``[lo, hi)`` ([hi-lo, D], float32, on the prompts' device):
    ``stage1`` maps global labels to text features (``Stage1Model`` over ``ShardedPromptLearner``)."""
    device = stage1.prompts.ctx.device
    labels = torch.arange(lo, hi, device=device)
    return torch.cat([stage1(labels[i:i + chunk]).float() for i in range(0, hi - lo, chunk)])


def save_text_feature_rows(rows: torch.Tensor, lo: int, num_classes: int, directory: str | Path,
                           group=None) -> Path:
    """A collective: every rank writes its rows ``[lo, lo + len(rows))``; returns the index path."""
    return save_rows(directory, TEXT_FEATURES_STEM, TEXT_FEATURES_FORMAT, num_classes, lo, lo + rows.shape[0],
                     {"text_features": rows}, {"dim": int(rows.shape[1])}, group)


def has_text_feature_rows(directory: str | Path) -> bool:
    return (Path(directory) / f"{TEXT_FEATURES_STEM}.json").is_file()


def load_text_feature_rows(directory: str | Path, num_classes: int, lo: int, hi: int) -> torch.Tensor:
    """Rows ``[lo, hi)`` of a saved text-feature table (any saving rank count), sha256 checked;
    refused with the file named when the index is missing, of another table, or a part damaged."""
    index_file = f"{TEXT_FEATURES_STEM}.json"
    index = read_index(directory, index_file, TEXT_FEATURES_FORMAT)
    if index["num_classes"] != num_classes:
        raise ValueError(f"{Path(directory) / index_file}: text features of {index['num_classes']} identities, "
                         f"this run has {num_classes}")
    rows = load_rows(directory, index, lo, hi, ["text_features"], index_file)["text_features"]
    log.info(f"text features of identities [{lo}, {hi}) from {directory} (saved by {index['saved_by_ranks']} ranks)")
    return rows


def prompt_memory_bytes(num_classes: int, world: int = 1, *, n_ctx: int = 4, token_dim: int = 512,
                        text_dim: int = 512, optimizer_states: int = 2, bytes_per_value: int = 4) -> dict[str, int]:
    """Per-worker bytes of the largest rank's CLIP-ReID identity state (fp32, Adam/AdamW's 2
    states): prompt tokens, their dense gradient (``ctx[labels]``'s backward fills the whole
    shard), the optimizer state, and the frozen text features kept for stage 2.
    ``world=1`` is also the replicated layout (every worker holds all of it)."""
    rows = max(hi - lo for lo, hi in (shard_range(num_classes, k, world) for k in range(world)))
    table = rows * n_ctx * token_dim * bytes_per_value
    return {"prompts": table, "gradient": table, "optimizer_state": optimizer_states * table,
            "text_features": rows * text_dim * bytes_per_value}
