import json

import pytest
import torch

from reidscale.config import ConfigError
from reidscale.data.transforms import TransformConfig
from reidscale.models.backbone import ModelConfig, build_backbone
from reidscale.models.reid import build_reid_model, export_embedding_model, load_embedding_model

TINY = ModelConfig(width=32, layers=1, heads=2, patch_size=8, embed_dim=16)
SIZE = TransformConfig(height=32, width=16)


def test_reid_model_shapes_and_unit_norm_embeddings():
    torch.manual_seed(0)
    model = build_reid_model(TINY, SIZE, num_classes=7)
    x = torch.randn(6, 3, 32, 16)
    feat, logits = model(x)
    assert feat.shape == (6, 16) and logits.shape == (6, 7)
    model.eval()
    emb = model.embedding(x)
    torch.testing.assert_close(emb.norm(dim=1), torch.ones(6))
    # different inputs give different embeddings
    assert (emb[0] - emb[1]).abs().max() > 1e-4


def test_export_reloads_bit_identically_without_the_classifier(tmp_path):
    torch.manual_seed(0)
    model = build_reid_model(TINY, SIZE, num_classes=7)
    model.eval()
    out = export_embedding_model(model.embedding, TINY, SIZE, tmp_path / "export", extra={"note": "x"})
    loaded, config = load_embedding_model(out)
    x = torch.randn(4, 3, 32, 16)
    assert torch.equal(loaded(x), model.embedding(x))
    names = set(loaded.state_dict())
    assert not any("classifier" in n for n in names)
    assert config["note"] == "x" and config["dim"] == 16
    assert json.loads((out / "config.json").read_text())["format"] == "reidscale-embedding-v1"
    # no pickle anywhere in the export
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


def test_re_export_replaces_atomically(tmp_path):
    model = build_reid_model(TINY, SIZE, num_classes=3)
    target = tmp_path / "export"
    export_embedding_model(model.embedding, TINY, SIZE, target)
    with torch.no_grad():
        model.embedding.neck.bn.weight.fill_(2.0)
    export_embedding_model(model.embedding, TINY, SIZE, target)
    loaded, _ = load_embedding_model(target)
    assert torch.all(loaded.neck.bn.weight == 2.0)
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_patch_size_must_divide_the_image():
    with pytest.raises(ConfigError, match="patch_size"):
        build_backbone(ModelConfig(width=32, layers=1, heads=2, patch_size=7), (32, 16))


def test_pretrained_tag_offline_fails_fast_and_clearly(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
        build_backbone(ModelConfig(open_clip_model="ViT-B-16", pretrained="openai"), (256, 128))
    with pytest.raises(ConfigError, match="neither a file nor a pretrained tag"):
        build_backbone(ModelConfig(open_clip_model="ViT-B-16", pretrained="no-such-tag"), (256, 128))
