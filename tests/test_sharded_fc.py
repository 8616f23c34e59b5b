"""Sharded (model-parallel) Partial FC on 2 real gloo ranks against a replicated reference.

One spawn of 2 processes (``ranks`` fixture) runs every distributed scenario; each test checks
one of them against a computation made here, in the test process, on the concatenated global
batch: a plain cosine head over the whole table with ``cross_entropy_label_smooth`` (itself
checked against ``F.cross_entropy(label_smoothing=)``), the backbone as a plain ``nn.Linear``.
The ranks' backbone is a real DeepSpeed engine (ZeRO 0), so its gradient averaging is the one
training uses. Tolerance 1e-5 (fp32; only the order of the all-reduce sums differs).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gloo_ranks import run_ranks
from reidscale.losses import cross_entropy_label_smooth
from reidscale.models.sharded_fc import ShardedPartialFC, head_optimizer, init_rows, shard_range
from reidscale.models.sharded_fc_checkpoint import INDEX_FILE, load_sharded_fc, read_index, save_sharded_fc

WORLD = 2
C, D_IN, D, B = 24, 6, 8, 6  # identities, backbone input, feature dim, rows per rank
SCALE, MARGIN, EPS, SEED = 16.0, 0.2, 0.1, 3
C2, RATE2 = 40, 0.25  # the sampled scenario: 20 identities per shard, 5 columns each
LABELS2 = torch.tensor([2, 2, 5, 11, 20, 22, 25, 27, 31, 33, 38, 5])  # shard 0: 3 ids, shard 1: 7
TOL = dict(rtol=1e-5, atol=1e-6)
TIMEOUT_S = 300


def global_batch(seed: int, dim: int = D_IN, classes: int = C) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(WORLD * B, dim, generator=g)
    y = torch.randint(0, classes, (WORLD * B // 2,), generator=g).repeat_interleave(2)  # K=2
    return x, y


def reference_logits(feat, centres, labels, margin=MARGIN):
    cos = F.normalize(feat, dim=1) @ F.normalize(centres, dim=1).t()
    return SCALE * (cos - margin * F.one_hot(labels, centres.shape[0]))


def optimizer_steps(head, opt, steps, first=0, rows=slice(None)):
    """``steps`` optimizer steps of the head on fixed features (the global batch of each step)."""
    for step in range(first, first + steps):
        feat, y = global_batch(100 + step, dim=D)
        out = head(feat[rows], y[rows], step=step)
        opt.zero_grad()
        out.loss.backward()
        opt.step()


# ---------------------------------------------------------------- the 2-rank side

def _worker(rank: int, world: int, tmp: str) -> dict:
    from reidscale.train.engine import initialize_deepspeed

    out = {}
    mine = slice(rank * B, (rank + 1) * B)

    # A: DeepSpeed backbone + sharded head at sample_rate=1 (margin, label smoothing)
    torch.manual_seed(0)
    backbone = nn.Linear(D_IN, D)
    engine, *_ = initialize_deepspeed(
        model=backbone, optimizer=torch.optim.SGD(backbone.parameters(), lr=0.1),
        config={"train_micro_batch_size_per_gpu": B, "zero_optimization": {"stage": 0}, "steps_per_print": 10**9})
    x, y = global_batch(0)
    head = ShardedPartialFC(D, C, sample_rate=1.0, scale=SCALE, margin=MARGIN, label_smoothing=EPS, seed=SEED)
    feat = engine(x[mine])
    feat.retain_grad()
    o = head(feat, y[mine], step=0)
    engine.backward(o.loss)
    out.update(a_loss=o.loss.detach(), a_acc=o.accuracy, a_columns=torch.tensor(o.columns), a_feat_grad=feat.grad,
               a_backbone_w=engine.module.weight.grad, a_backbone_b=engine.module.bias.grad,
               a_centre_grad=head.weight.grad)

    # B: sample_rate < 1 on fixed features
    g = torch.Generator().manual_seed(7)
    feat_all = torch.randn(WORLD * B, D, generator=g)
    feat = feat_all[mine].clone().requires_grad_(True)
    head = ShardedPartialFC(D, C2, sample_rate=RATE2, scale=SCALE, margin=MARGIN, label_smoothing=EPS, seed=SEED)
    o = head(feat, LABELS2[mine], step=5)
    o.loss.backward()
    idx, n_pos = head.sample(LABELS2, step=5)
    out.update(b_loss=o.loss.detach(), b_acc=o.accuracy, b_idx=idx + head.lo, b_npos=torch.tensor(n_pos),
               b_columns=torch.tensor(o.columns), b_idx_again=head.sample(LABELS2, step=5)[0] + head.lo,
               b_idx_next=head.sample(LABELS2, step=6)[0] + head.lo, b_feat_grad=feat.grad,
               b_centre_grad=head.weight.grad)

    # C: AdamW, 2 steps, save, a 3rd step
    head = ShardedPartialFC(D, C, sample_rate=1.0, scale=SCALE, margin=MARGIN, label_smoothing=EPS, seed=SEED)
    opt = head_optimizer(head, "adamw", lr=0.05)
    optimizer_steps(head, opt, 2, rows=mine)
    save_sharded_fc(head, opt, Path(tmp) / "saved_by_2")
    s = opt.state[head.weight]
    out.update(c_weight=head.weight.detach().clone(), c_exp_avg=s["exp_avg"].clone(),
               c_exp_avg_sq=s["exp_avg_sq"].clone(), c_step=s["step"].clone().reshape(1))
    optimizer_steps(head, opt, 1, first=2, rows=mine)
    out["c_weight_after"] = head.weight.detach().clone()

    # D: load what one process saved (SGD momentum), a further step
    head = ShardedPartialFC(D, C, sample_rate=1.0, scale=SCALE, margin=MARGIN, label_smoothing=EPS, seed=SEED)
    opt = head_optimizer(head, "sgd", lr=0.5, momentum=0.9)
    load_sharded_fc(head, opt, Path(tmp) / "saved_by_1")
    out.update(d_weight=head.weight.detach().clone(), d_momentum=opt.state[head.weight]["momentum_buffer"].clone())
    optimizer_steps(head, opt, 1, first=2, rows=mine)
    out["d_weight_after"] = head.weight.detach().clone()

    # E: unequal batches are refused on every rank, not left hanging in a gather
    try:
        head(torch.zeros(B + rank, D), torch.zeros(B + rank, dtype=torch.int64), step=0)
        out["e_refused"] = torch.tensor(0)
    except ValueError as err:
        out["e_refused"] = torch.tensor(int("same per-worker batch" in str(err)))
    return out


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sharded_fc")
    # what one process saves, for scenario D (1 -> 2)
    head = ShardedPartialFC(D, C, sample_rate=1.0, scale=SCALE, margin=MARGIN, label_smoothing=EPS, seed=SEED)
    opt = head_optimizer(head, "sgd", lr=0.5, momentum=0.9)
    optimizer_steps(head, opt, 2)
    save_sharded_fc(head, opt, tmp / "saved_by_1")
    one = {"weight": head.weight.detach().clone(), "momentum": opt.state[head.weight]["momentum_buffer"].clone()}
    optimizer_steps(head, opt, 1, first=2)
    one["weight_after"] = head.weight.detach().clone()

    per_rank = run_ranks(_worker, WORLD, tmp, TIMEOUT_S)
    return {"ranks": per_rank, "tmp": tmp, "one": one}


def _cat(ranks, key):
    return torch.cat([r[key] for r in ranks["ranks"]])


# ---------------------------------------------------------------- tests

def test_reference_loss_is_torch_label_smoothed_cross_entropy():
    x, y = global_batch(0, dim=D)
    logits = reference_logits(x, init_rows(0, C, D, SEED), y)
    torch.testing.assert_close(cross_entropy_label_smooth(logits, y, EPS),
                               F.cross_entropy(logits, y, label_smoothing=EPS), **TOL)


def test_initial_rows_do_not_depend_on_the_shard_layout():
    whole = init_rows(0, 9000, 4, SEED)  # crosses an 8192-row block
    torch.testing.assert_close(init_rows(8000, 8400, 4, SEED), whole[8000:8400], rtol=0, atol=0)
    assert shard_range(C, 1, WORLD) == (12, 24)


def test_full_rate_loss_and_gradients_equal_replicated_head_after_deepspeed_averaging(ranks):
    torch.manual_seed(0)
    backbone = nn.Linear(D_IN, D)  # the ranks' initial backbone
    x, y = global_batch(0)
    centres = init_rows(0, C, D, SEED).requires_grad_(True)
    feat = backbone(x)
    feat.retain_grad()
    logits = reference_logits(feat, centres, y)
    loss = cross_entropy_label_smooth(logits, y, EPS)
    loss.backward()
    for r in ranks["ranks"]:
        torch.testing.assert_close(r["a_loss"], loss.detach().reshape(1), **TOL)  # the same loss on every rank
        assert float(r["a_acc"]) == pytest.approx(float((logits.argmax(1) == y).float().mean()))
        assert int(r["a_columns"]) == C // WORLD
        # DeepSpeed averaged the backbone gradient over the ranks: equal to one process on the global batch
        torch.testing.assert_close(r["a_backbone_w"], backbone.weight.grad, **TOL)
        torch.testing.assert_close(r["a_backbone_b"], backbone.bias.grad, **TOL)
    # a rank's feature gradient is W x its rows' share of the global mean (what data parallel gives
    # each rank for its local mean), so the 1/W averaging lands on the global gradient
    torch.testing.assert_close(_cat(ranks, "a_feat_grad"), WORLD * feat.grad, **TOL)
    # the centres (outside DeepSpeed, not averaged) get exactly the replicated gradient
    torch.testing.assert_close(_cat(ranks, "a_centre_grad"), centres.grad, **TOL)


def test_sampled_shards_score_every_positive_and_the_configured_negatives(ranks):
    per_shard = (C2 // WORLD) * RATE2  # 5 columns per shard of 20 identities
    for rank, r in enumerate(ranks["ranks"]):
        lo, hi = shard_range(C2, rank, WORLD)
        positives = sorted({int(v) for v in LABELS2 if lo <= v < hi})
        idx = r["b_idx"].tolist()
        assert idx[:len(positives)] == positives  # every positive, ascending, first
        assert int(r["b_npos"]) == len(positives)
        negatives = idx[len(positives):]
        assert len(negatives) == max(0, per_shard - len(positives))  # shard 0: 3 + 2; shard 1: 7 + 0
        assert all(lo <= v < hi and v not in positives for v in negatives) and len(set(idx)) == len(idx)
        assert int(r["b_columns"]) == len(idx)
        assert r["b_idx_again"].tolist() == idx  # seeded by step: a resumed run draws the same
    rank0 = ranks["ranks"][0]
    assert rank0["b_idx_next"].tolist()[:3] == rank0["b_idx"].tolist()[:3]
    assert rank0["b_idx_next"].tolist() != rank0["b_idx"].tolist()  # another step, other negatives


def test_sampled_loss_equals_cross_entropy_over_the_union_of_sampled_columns(ranks):
    cols = _cat(ranks, "b_idx")  # the global class of each column, shard by shard
    g = torch.Generator().manual_seed(7)
    feat = torch.randn(WORLD * B, D, generator=g).requires_grad_(True)
    table = init_rows(0, C2, D, SEED).requires_grad_(True)
    targets = torch.tensor([cols.tolist().index(int(v)) for v in LABELS2])
    logits = reference_logits(feat, table[cols], targets)
    loss = cross_entropy_label_smooth(logits, targets, EPS)
    loss.backward()
    for r in ranks["ranks"]:
        torch.testing.assert_close(r["b_loss"], loss.detach().reshape(1), **TOL)
        assert float(r["b_acc"]) == pytest.approx(float((logits.argmax(1) == targets).float().mean()))
    torch.testing.assert_close(_cat(ranks, "b_feat_grad"), WORLD * feat.grad, **TOL)
    torch.testing.assert_close(_cat(ranks, "b_centre_grad"), table.grad, **TOL)


def test_saved_by_two_ranks_loads_in_one_process_with_the_same_rows_and_adamw_state(ranks):
    index = read_index(ranks["tmp"] / "saved_by_2")
    assert index["saved_by_ranks"] == WORLD and [s["lo"] for s in index["shards"]] == [0, C // WORLD]
    head = ShardedPartialFC(D, C, sample_rate=1.0, scale=SCALE, margin=MARGIN, label_smoothing=EPS, seed=SEED,
                            rank=0, world=1)
    opt = head_optimizer(head, "adamw", lr=0.05)
    load_sharded_fc(head, opt, ranks["tmp"] / "saved_by_2")
    s = opt.state[head.weight]
    torch.testing.assert_close(head.weight.detach(), _cat(ranks, "c_weight"), rtol=0, atol=0)
    torch.testing.assert_close(s["exp_avg"], _cat(ranks, "c_exp_avg"), rtol=0, atol=0)
    torch.testing.assert_close(s["exp_avg_sq"], _cat(ranks, "c_exp_avg_sq"), rtol=0, atol=0)
    assert float(s["step"]) == 2.0 == float(ranks["ranks"][0]["c_step"])
    # and continues as the 2-rank run did (the softmax is exact, so the step does not depend on W)
    optimizer_steps(head, opt, 1, first=2)
    torch.testing.assert_close(head.weight.detach(), _cat(ranks, "c_weight_after"), **TOL)


def test_saved_by_one_process_loads_resharded_on_two_ranks_with_sgd_momentum(ranks):
    one = ranks["one"]
    torch.testing.assert_close(_cat(ranks, "d_weight"), one["weight"], rtol=0, atol=0)
    torch.testing.assert_close(_cat(ranks, "d_momentum"), one["momentum"], rtol=0, atol=0)
    torch.testing.assert_close(_cat(ranks, "d_weight_after"), one["weight_after"], **TOL)


def test_unequal_batches_are_refused_on_every_rank(ranks):
    assert [int(r["e_refused"]) for r in ranks["ranks"]] == [1, 1]


def _saved_one(tmp: Path) -> Path:
    head = ShardedPartialFC(D, C, sample_rate=1.0, seed=SEED)
    opt = head_optimizer(head, "adamw", lr=0.05)
    optimizer_steps(head, opt, 1)
    save_sharded_fc(head, opt, tmp)
    return tmp


def test_damaged_shard_file_is_refused_naming_it(tmp_path):
    directory = _saved_one(tmp_path)
    shard = directory / read_index(directory)["shards"][0]["file"]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    head = ShardedPartialFC(D, C, seed=SEED)
    with pytest.raises(ValueError, match=shard.name):
        load_sharded_fc(head, head_optimizer(head, "adamw", lr=0.05), directory)


def test_checkpoint_without_index_or_of_another_table_is_refused(tmp_path):
    directory = _saved_one(tmp_path)
    other = ShardedPartialFC(D, C + 1, seed=SEED)
    with pytest.raises(ValueError, match="24 identities"):
        load_sharded_fc(other, None, directory)
    sgd_head = ShardedPartialFC(D, C, seed=SEED)
    with pytest.raises(ValueError, match="AdamW"):
        load_sharded_fc(sgd_head, head_optimizer(sgd_head, "sgd", lr=0.1), directory)
    (directory / INDEX_FILE).unlink()
    with pytest.raises(FileNotFoundError, match=INDEX_FILE):
        load_sharded_fc(sgd_head, None, directory)
