import json

import pytest

from reidscale.train.checkpoint import CheckpointError, verify_complete, write_rank_listing, write_state


def _checkpoint(root, world=2):
    for rank in range(world):
        d = root / f"r{rank}"
        d.mkdir()
        (d / "state").mkdir()
        (d / "state" / f"zero_pp_rank_{rank}_optim_states.pt").write_bytes(bytes([rank]) * 100)
        (d / "latest").write_text("state")
        write_rank_listing(d, rank)
    merged = root / "merged"
    merged.mkdir()
    for rank in range(world):
        for p in (root / f"r{rank}").rglob("*"):
            if p.is_file():
                target = merged / p.relative_to(root / f"r{rank}")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(p.read_bytes())
    write_state(merged, {"world_size": world, "epoch": 1, "step_in_epoch": 3, "global_step": 11})
    return merged


def test_a_complete_checkpoint_is_accepted(tmp_path):
    state = verify_complete(_checkpoint(tmp_path))
    assert state["global_step"] == 11


def test_missing_rank_listing_is_refused(tmp_path):
    ckpt = _checkpoint(tmp_path)
    (ckpt / "rank-1.json").unlink()
    with pytest.raises(CheckpointError, match="rank 1 never finished"):
        verify_complete(ckpt)


def test_truncated_file_is_refused(tmp_path):
    ckpt = _checkpoint(tmp_path)
    victim = ckpt / "state" / "zero_pp_rank_0_optim_states.pt"
    victim.write_bytes(victim.read_bytes()[:10])
    with pytest.raises(CheckpointError, match="zero_pp_rank_0"):
        verify_complete(ckpt)


def test_no_state_means_never_completed(tmp_path):
    ckpt = _checkpoint(tmp_path)
    (ckpt / "reidscale_state.json").unlink()
    with pytest.raises(CheckpointError, match="never completed"):
        verify_complete(ckpt)
    assert json.loads((ckpt / "rank-0.json").read_text())["rank"] == 0
