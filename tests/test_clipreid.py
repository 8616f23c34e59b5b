"""CLIP-ReID pieces: prompts, the stage-1 step in a plain loop, the stage-2 i2t term, and both
stages in the distributed trainer."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from reidscale.config import load_config
from reidscale.losses import supervised_contrastive_i2t, supervised_contrastive_t2i
from reidscale.models.backbone import ModelConfig
from reidscale.models.prompt_learner import PromptLearner, Stage1Model, TextTower, all_text_features, build_clip
from reidscale.models.reid import ReIDModel
from reidscale.train.config import TrainJobConfig
from reidscale.train.recipes import compute_loss

REPO = Path(__file__).resolve().parents[1]
TINY = ModelConfig(width=32, layers=1, heads=2, patch_size=8, embed_dim=16)


@pytest.fixture
def clip():
    torch.manual_seed(0)
    return build_clip(TINY, (32, 16))


def test_prompts_differ_by_identity_and_only_the_tokens_train(clip):
    stage1 = Stage1Model(PromptLearner(5, clip.token_embedding, n_ctx=4), TextTower(clip))
    feats = stage1(torch.tensor([0, 1, 1]))
    assert feats.shape == (3, 16)
    torch.testing.assert_close(feats[1], feats[2])
    assert (feats[0] - feats[1]).abs().max() > 1e-6
    assert [n for n, p in stage1.named_parameters() if p.requires_grad] == ["prompts.ctx"]
    assert all_text_features(stage1, 5).shape == (5, 16)


def test_stage1_plain_loop_learns_prompts_with_frozen_encoders(clip):
    torch.manual_seed(1)
    stage1 = Stage1Model(PromptLearner(6, clip.token_embedding, n_ctx=4), TextTower(clip))
    visual = clip.visual.eval()
    images = torch.randn(24, 3, 32, 16)
    labels = torch.arange(6).repeat_interleave(4)
    with torch.no_grad():
        image_features = visual(images)
    frozen = {n: p.clone() for n, p in stage1.text.named_parameters()}
    optimizer = torch.optim.Adam([stage1.prompts.ctx], lr=1e-2)

    def loss_fn():
        text = stage1(labels)
        return (supervised_contrastive_i2t(image_features, text, labels, 1.0)
                + supervised_contrastive_t2i(image_features, text, labels, 1.0))

    first = float(loss_fn().detach())
    for _ in range(30):
        loss = loss_fn()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert float(loss_fn().detach()) < first - 0.1
    for n, p in stage1.text.named_parameters():
        assert torch.equal(p, frozen[n]), n


def test_stage2_adds_the_image_to_text_cross_entropy(clip):
    cfg = load_config(TrainJobConfig, None, ["recipe=clipreid", "loss.label_smoothing=0.0"])
    model = ReIDModel(clip.visual, 16, 6)
    images, labels = torch.randn(8, 3, 32, 16), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    text = torch.randn(6, 16)
    torch.manual_seed(0)
    total, terms = compute_loss(model, images, labels, cfg, text)
    feat, _ = model(images)
    expected = F.cross_entropy(feat @ text.t(), labels)  # plain reference, no smoothing
    assert terms["i2t"] == pytest.approx(float(expected), rel=1e-5)
    _, without = compute_loss(model, images, labels, cfg, None)
    assert "i2t" not in without


# The two-stage recipe through the real training job, and stage 1 skipped on every way of
# going on (same run dir, a damaged newest checkpoint, train.resume_from into a new run dir):
# tests/test_recovery.py, whose runs are CLIP-ReID's.
