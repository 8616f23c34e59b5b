"""Partial FC and SIE inside the real training step (``loop.compute_loss`` + ``make_optimizer``),
and cameras at validation time."""

import io

import numpy as np
import pyarrow as pa
import pytest
import torch
import torch.nn.functional as F

from reidscale.config import load_config
from reidscale.data.transforms import TransformConfig
from reidscale.losses import cross_entropy_label_smooth
from reidscale.models.backbone import ModelConfig
from reidscale.models.reid import build_reid_model, side_inputs
from reidscale.train.config import TrainJobConfig
from reidscale.train.engine import make_optimizer
from reidscale.train.recipes import compute_loss

TOY = ["model.width=32", "model.layers=1", "model.heads=2", "model.patch_size=8", "model.embed_dim=16",
       "transform.height=32", "transform.width=16"]


def _job(*overrides: str) -> TrainJobConfig:
    return load_config(TrainJobConfig, None, [*TOY, *overrides])


def _model(cfg: TrainJobConfig, num_classes: int):
    torch.manual_seed(0)
    return build_reid_model(cfg.model, cfg.transform, num_classes)


def test_a_partial_fc_step_updates_only_the_sampled_centres_and_scores_sampled_targets():
    cfg = _job("model.classifier=partial_fc", "model.sample_rate=0.05", "model.cosine_scale=30",
               "optim.optimizer=adamw", "optim.weight_decay=0.05", "loss.label_smoothing=0.1")
    model = _model(cfg, num_classes=400).train()
    head = model.classifier
    drawn = []
    sample = head.sample
    head.sample = lambda labels: drawn.append(sample(labels)) or drawn[-1]
    optimizer = make_optimizer(model, cfg)
    before = head.weight.detach().clone()
    images, labels = torch.randn(8, 3, 32, 16), torch.tensor([3, 3, 57, 57, 210, 210, 399, 399])

    loss, terms = compute_loss(model, images, labels, cfg)
    (index,) = drawn
    assert len(index) == 20 and index[:4].tolist() == [3, 57, 210, 399]  # positives first, then 5% of 400
    # the ID term against a plain reference: cosine logits over the sampled centres, targets = label's column
    with torch.no_grad():
        neck = model.embedding.neck(model.embedding.features(images))
    reference = 30.0 * F.normalize(neck, dim=1) @ F.normalize(before[index], dim=1).t()
    targets = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    assert terms["id"] == pytest.approx(float(cross_entropy_label_smooth(reference, targets, 0.1)), rel=1e-4)

    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    changed = (head.weight.detach() - before).abs().sum(1).nonzero().flatten()
    assert sorted(changed.tolist()) == sorted(index.tolist())


def test_sie_camera_embeddings_get_gradient_through_compute_loss():
    cfg = _job("model.sie_cameras=6")
    model = _model(cfg, num_classes=4).train()
    batch_cameras = np.array([0, 0, 1, 1, 2, 2, 5, 5])  # what PKStream yields, numpy int64
    side = side_inputs(model, batch_cameras)
    loss, _ = compute_loss(model, torch.randn(8, 3, 32, 16), torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]), cfg, **side)
    loss.backward()
    grad = model.embedding.backbone.sie_embed.grad
    assert grad is not None
    per_camera = grad.abs().sum(1)
    assert (per_camera[[0, 1, 2, 5]] > 0).all() and (per_camera[[3, 4]] == 0).all()


def test_side_inputs_are_empty_without_sie_and_refuse_unknown_cameras():
    plain = _model(_job(), num_classes=3)
    assert side_inputs(plain, np.array([0, 7])) == {}
    sie = _model(_job("model.sie_cameras=3"), num_classes=3)
    with pytest.raises(ValueError, match="model.sie_cameras"):
        side_inputs(sie, np.array([0, -1]))  # -1 (unknown camera) would index the last row
    with pytest.raises(ValueError, match="model.sie_cameras"):
        side_inputs(sie.embedding, np.array([3]))
    with pytest.raises(ValueError, match="model.sie_cameras"):
        side_inputs(sie, None)


def test_validation_embeds_each_image_with_its_own_camera():
    from PIL import Image

    from reidscale.train.validation import _embed_part

    cfg = TransformConfig(height=32, width=16)
    model = _model(_job("model.sie_cameras=3"), num_classes=3).embedding.eval()
    rng = np.random.default_rng(0)
    jpegs = []
    for _ in range(4):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (32, 16, 3), dtype=np.uint8)).save(buf, format="JPEG")
        jpegs.append(buf.getvalue())
    cameras = np.array([0, 1, 2, 1])
    table = pa.table({"image": pa.array(jpegs, pa.binary()), "camera": pa.array(cameras, pa.int32())})
    got = _embed_part(model, table, cfg, torch.device("cpu"), torch.float32, batch_size=3)
    from reidscale.data.transforms import decode_batch

    x = torch.from_numpy(decode_batch({"image": np.array(jpegs, dtype=object)}, cfg, train=False)["image"])
    with torch.no_grad():
        want = model(x, cameras=torch.from_numpy(cameras)).numpy()
        without = model(x).numpy()
    np.testing.assert_allclose(got, want, atol=1e-6)
    assert np.abs(got - without).max() > 1e-4
