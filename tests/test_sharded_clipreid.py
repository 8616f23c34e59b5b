"""Identity-sharded CLIP-ReID on 2 real gloo ranks against the replicated losses.

One spawn of 2 processes (``ranks`` fixture) runs every distributed scenario; each test checks
one against a computation made here, in the test process, on the concatenated global batch with
the replicated pieces: a plain ``PromptLearner`` over all identities, ``supervised_contrastive_i2t``
/ ``_t2i`` and ``i2t_cross_entropy`` from ``losses/image_text.py``. The stage-2 backbone is a real
DeepSpeed engine (ZeRO 0), so its gradient averaging is the one training uses.
Tolerance: stage 1 runs in float64 on the ranks and here (rtol 1e-9, atol 1e-11: the text
tower's fp32 rounding, ~1e-6 on a prompt gradient, would otherwise hide as much as it shows);
stage 2 and the text-feature table in fp32 as trained, against float64 / fp32 references,
rtol 1e-5, atol 1e-6. Only the order of sums differs.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from gloo_ranks import run_ranks
from reidscale.losses import i2t_cross_entropy, supervised_contrastive_i2t, supervised_contrastive_t2i
from reidscale.losses.sharded_image_text import sharded_i2t_cross_entropy, sharded_supervised_contrastive
from reidscale.models.backbone import ModelConfig
from reidscale.models.prompt_learner import PromptLearner, Stage1Model, TextTower, all_text_features, build_clip
from reidscale.models.sharded_fc import shard_range
from reidscale.models.sharded_prompts import (TEXT_FEATURES_STEM, ShardedPromptLearner, initial_contexts,
                                              load_text_feature_rows, range_text_features, save_text_feature_rows)

WORLD = 2
C, B, N_CTX, SEED, EPS = 10, 4, 2, 5, 0.1  # identities, rows per rank, prompt tokens, init seed, smoothing
TINY = ModelConfig(width=32, layers=1, heads=2, patch_size=8, embed_dim=16)
D = TINY.embed_dim  # the projected feature dim (image and text)
# global batch of stage 1: identity 1 on both ranks, 7 twice on rank 1, every identity of rank 0's range
# [0, 5) and rank 1's [5, 10) present somewhere; ONE_SIDED: every identity in rank 0's range
LABELS = torch.tensor([1, 3, 6, 1, 7, 7, 1, 9])
ONE_SIDED = torch.tensor([0, 1, 1, 2, 4, 3, 0, 2])
D_IN = 6  # the stage-2 stand-in backbone's input
TOL = dict(rtol=1e-5, atol=1e-6)
TOL64 = dict(rtol=1e-9, atol=1e-11)
TIMEOUT_S = 300


def tiny_clip() -> nn.Module:
    torch.manual_seed(0)  # the same weights in the test process and on every rank
    return build_clip(TINY, (32, 16), text_width=16, text_layers=1, text_heads=2)


def image_features(seed: int) -> torch.Tensor:
    return torch.randn(WORLD * B, D, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def text_table() -> torch.Tensor:
    return torch.randn(C, D, generator=torch.Generator().manual_seed(11))


def stage2_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(12)
    return torch.randn(WORLD * B, D_IN, generator=g), torch.randint(0, C, (WORLD * B,), generator=g)


def replicated_stage1(clip, dtype=torch.float32) -> Stage1Model:
    """The unsharded prompt learner, started from the same tokens as the shards."""
    prompts = PromptLearner(C, clip.token_embedding, n_ctx=N_CTX).to(dtype)
    clip.to(dtype)
    with torch.no_grad():
        prompts.ctx.copy_(initial_contexts(0, C, N_CTX, prompts.ctx.shape[-1], SEED))
    return Stage1Model(prompts, TextTower(clip))


# ---------------------------------------------------------------- the 2-rank side

def _ctx_grad(stage1):
    # None when none of this rank's identities is in the batch (nothing reached its prompts)
    g = stage1.prompts.ctx.grad
    return torch.zeros_like(stage1.prompts.ctx) if g is None else g.clone()


def _stage1(stage1, lo, hi, feats, labels, mine, out, tag):
    feat = feats[mine].clone().requires_grad_(True)
    i2t, t2i = sharded_supervised_contrastive(feat, labels[mine], stage1, lo, hi)
    i2t.backward(retain_graph=True)
    out[f"{tag}_i2t_feat_grad"] = feat.grad.clone()
    out[f"{tag}_i2t_ctx_grad"] = _ctx_grad(stage1)
    feat.grad, stage1.prompts.ctx.grad = None, None
    t2i.backward()
    out[f"{tag}_t2i_feat_grad"] = feat.grad.clone()
    out[f"{tag}_t2i_ctx_grad"] = _ctx_grad(stage1)
    stage1.prompts.ctx.grad = None
    out.update({f"{tag}_i2t": i2t.detach(), f"{tag}_t2i": t2i.detach()})


def _worker(rank: int, world: int, tmp: str) -> dict:
    from reidscale.train.engine import initialize_deepspeed

    out = {}
    mine = slice(rank * B, (rank + 1) * B)
    clip = tiny_clip()
    prompts = ShardedPromptLearner(C, clip.token_embedding, n_ctx=N_CTX, seed=SEED)
    stage1_fp32 = Stage1Model(prompts, TextTower(clip))
    lo, hi = prompts.lo, prompts.hi
    out["ctx_initial"] = prompts.ctx.detach().clone()
    clip64 = tiny_clip().double()
    stage1 = Stage1Model(ShardedPromptLearner(C, clip64.token_embedding, n_ctx=N_CTX, seed=SEED).double(),
                         TextTower(clip64))

    # A: stage 1, identities of both ranges in the batch; A1: all in rank 0's range (rank 1 has no columns)
    _stage1(stage1, lo, hi, image_features(1), LABELS, mine, out, "a")
    _stage1(stage1, lo, hi, image_features(2), ONE_SIDED, mine, out, "a1")

    # B: stage 2's i2t through a DeepSpeed backbone, the frozen text features sharded
    torch.manual_seed(0)
    backbone = nn.Linear(D_IN, D)
    engine, *_ = initialize_deepspeed(
        model=backbone, optimizer=torch.optim.SGD(backbone.parameters(), lr=0.1),
        config={"train_micro_batch_size_per_gpu": B, "zero_optimization": {"stage": 0}, "steps_per_print": 10**9})
    x, y = stage2_batch()
    feat = engine(x[mine])
    feat.retain_grad()
    loss = sharded_i2t_cross_entropy(feat, y[mine], text_table()[lo:hi], lo, epsilon=EPS)
    engine.backward(loss)
    out.update(b_loss=loss.detach(), b_feat_grad=feat.grad, b_backbone_w=engine.module.weight.grad,
               b_backbone_b=engine.module.bias.grad)

    # C: this range's text features, saved as one table by 2 ranks; D: a table saved by 1 process, loaded here
    rows = range_text_features(stage1_fp32, lo, hi, chunk=3)
    save_text_feature_rows(rows, lo, C, Path(tmp) / "saved_by_2")
    out["c_rows"] = rows
    out["d_rows"] = load_text_feature_rows(Path(tmp) / "saved_by_1", C, lo, hi)
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded_clipreid")
    # what one process saves, for scenario D (1 -> 2): the replicated table
    table = all_text_features(replicated_stage1(tiny_clip()), C)
    save_text_feature_rows(table, 0, C, tmp / "saved_by_1")
    per_rank = run_ranks(_worker, WORLD, tmp, TIMEOUT_S)
    return {"ranks": per_rank, "tmp": tmp, "table": table}


def _cat(ranks, key):
    return torch.cat([r[key] for r in ranks["ranks"]])


def _replicated_stage1_grads(feats, labels):
    """(i2t, t2i, ∂i2t/∂f, ∂i2t/∂ctx, ∂t2i/∂f, ∂t2i/∂ctx): one process, the whole global batch."""
    stage1 = replicated_stage1(tiny_clip(), torch.float64)
    out = []
    for loss_fn in (supervised_contrastive_i2t, supervised_contrastive_t2i):
        feat = feats.clone().requires_grad_(True)
        stage1.prompts.ctx.grad = None
        loss = loss_fn(feat, stage1(labels), labels, 1.0)
        loss.backward()
        out.append((loss.detach(), feat.grad, stage1.prompts.ctx.grad.clone()))
    return out


# ---------------------------------------------------------------- tests

def test_prompt_shards_start_from_the_rows_of_the_unsharded_table(ranks):
    whole = initial_contexts(0, C, N_CTX, ranks["ranks"][0]["ctx_initial"].shape[-1], SEED)
    torch.testing.assert_close(_cat(ranks, "ctx_initial"), whole, rtol=0, atol=0)
    assert [r["ctx_initial"].shape[0] for r in ranks["ranks"]] == [hi - lo for lo, hi in
                                                                     (shard_range(C, k, WORLD) for k in range(WORLD))]
    assert float(whole.std()) == pytest.approx(0.02, rel=0.3)  # CLIP-ReID's N(0, 0.02²)


@pytest.mark.parametrize("tag, seed, labels", [("a", 1, LABELS), ("a1", 2, ONE_SIDED)])
def test_stage1_losses_and_gradients_equal_the_replicated_single_process_batch(ranks, tag, seed, labels):
    (i2t, i2t_f, i2t_ctx), (t2i, t2i_f, t2i_ctx) = _replicated_stage1_grads(image_features(seed), labels)
    assert float(i2t) != pytest.approx(float(t2i))  # two different losses, so each comparison means something
    for r in ranks["ranks"]:  # the same global value on every rank
        torch.testing.assert_close(r[f"{tag}_i2t"], i2t.reshape(1), **TOL64)
        torch.testing.assert_close(r[f"{tag}_t2i"], t2i.reshape(1), **TOL64)
    # prompt rows: each rank holds the exact gradient of its identities (no averaging: outside DeepSpeed)
    torch.testing.assert_close(_cat(ranks, f"{tag}_i2t_ctx_grad"), i2t_ctx, **TOL64)
    torch.testing.assert_close(_cat(ranks, f"{tag}_t2i_ctx_grad"), t2i_ctx, **TOL64)
    assert i2t_ctx.abs().sum() > 0 and t2i_ctx.abs().sum() > 0
    # image features: W x the single-process gradient (DeepSpeed then divides the backbone's by W)
    torch.testing.assert_close(_cat(ranks, f"{tag}_i2t_feat_grad"), WORLD * i2t_f, **TOL64)
    torch.testing.assert_close(_cat(ranks, f"{tag}_t2i_feat_grad"), WORLD * t2i_f, **TOL64)


def test_stage2_i2t_loss_and_backbone_gradient_equal_the_replicated_batch_after_deepspeed_averaging(ranks):
    torch.manual_seed(0)
    backbone = nn.Linear(D_IN, D).double()
    x, y = stage2_batch()
    feat = backbone(x.double())
    feat.retain_grad()
    loss = i2t_cross_entropy(feat, text_table().double(), y, 1.0, epsilon=EPS)
    loss.backward()
    for r in ranks["ranks"]:
        torch.testing.assert_close(r["b_loss"].double(), loss.detach().reshape(1), **TOL)
        torch.testing.assert_close(r["b_backbone_w"].double(), backbone.weight.grad, **TOL)
        torch.testing.assert_close(r["b_backbone_b"].double(), backbone.bias.grad, **TOL)
    torch.testing.assert_close(_cat(ranks, "b_feat_grad").double(), WORLD * feat.grad, **TOL)


def test_text_features_computed_per_range_equal_the_replicated_table(ranks):
    torch.testing.assert_close(_cat(ranks, "c_rows"), ranks["table"], **TOL)


def test_text_features_saved_by_two_ranks_load_in_one_process_as_the_unsharded_table(ranks):
    directory = ranks["tmp"] / "saved_by_2"
    assert len(list(directory.glob(f"{TEXT_FEATURES_STEM}-*.safetensors"))) == WORLD
    loaded = load_text_feature_rows(directory, C, 0, C)
    torch.testing.assert_close(loaded, _cat(ranks, "c_rows"), rtol=0, atol=0)
    torch.testing.assert_close(loaded, ranks["table"], **TOL)
    # and re-sharded on 3 ranks, each reading only its rows
    parts = [load_text_feature_rows(directory, C, *shard_range(C, k, 3)) for k in range(3)]
    torch.testing.assert_close(torch.cat(parts), loaded, rtol=0, atol=0)


def test_text_features_saved_by_one_process_load_resharded_on_two_ranks(ranks):
    torch.testing.assert_close(_cat(ranks, "d_rows"), ranks["table"], rtol=0, atol=0)


def test_incomplete_damaged_or_foreign_text_feature_tables_are_refused(tmp_path):
    table = torch.randn(C, D)
    for k in range(WORLD):  # two ranks' files, written one after the other in one process
        lo, hi = shard_range(C, k, WORLD)
        save_text_feature_rows(table[lo:hi], lo, C, tmp_path / f"part{k}")
    # each directory's index covers one rank's range only: an incomplete table, refused
    with pytest.raises(ValueError, match=r"cover \[0, 5\) of 10"):
        load_text_feature_rows(tmp_path / "part0", C, 0, C)
    save_text_feature_rows(table, 0, C, tmp_path / "whole")
    with pytest.raises(ValueError, match="of 10 identities, this run has 11"):
        load_text_feature_rows(tmp_path / "whole", C + 1, 0, C + 1)
    shard = next((tmp_path / "whole").glob("*.safetensors"))
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=shard.name):
        load_text_feature_rows(tmp_path / "whole", C, 0, C)
    (tmp_path / "whole" / f"{TEXT_FEATURES_STEM}.json").unlink()
    with pytest.raises(FileNotFoundError, match=f"{TEXT_FEATURES_STEM}.json"):
        load_text_feature_rows(tmp_path / "whole", C, 0, C)


def test_prompt_memory_formula_counts_the_largest_ranks_live_tensors():
    from reidscale.models.sharded_prompts import prompt_memory_bytes, prompt_optimizer

    clip = tiny_clip()
    nbytes = lambda t: t.numel() * t.element_size()
    sizes = []
    for rank in range(3):  # 10 identities over 3 ranks: 3, 3, 4 rows
        prompts = ShardedPromptLearner(C, clip.token_embedding, n_ctx=N_CTX, seed=SEED, rank=rank, world=3)
        opt = prompt_optimizer(prompts, lr=1e-3, weight_decay=1e-4)
        prompts.ctx[torch.tensor([0])].sum().backward()  # one row used: the gradient is still the whole shard
        opt.step()
        state = sum(nbytes(v) for v in opt.state[prompts.ctx].values() if v.dim() > 0)
        sizes.append({"prompts": nbytes(prompts.ctx), "gradient": nbytes(prompts.ctx.grad), "optimizer_state": state,
                      "text_features": (prompts.hi - prompts.lo) * D * 4})
    largest = max(sizes, key=lambda s: s["prompts"])
    assert prompt_memory_bytes(C, 3, n_ctx=N_CTX, token_dim=16, text_dim=D) == largest
    assert largest["prompts"] == 4 * N_CTX * 16 * 4  # the tiny text tower's width is 16
