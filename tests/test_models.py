"""Backbones, ReID head, classifiers and exports, on tiny random models and checkpoints made here."""

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from reidscale.config import ConfigError, load_config
from reidscale.data.transforms import TransformConfig
from reidscale.models.backbone import ModelConfig, build_backbone
from reidscale.models.classifier import PartialFC, memory_bytes, sampled_targets
from reidscale.models.reid import EmbeddingModel, build_reid_model, export_embedding_model, load_embedding_model

REPO = Path(__file__).resolve().parents[1]
TINY = ModelConfig(width=32, layers=1, heads=2, patch_size=8, embed_dim=16)
SIZE = TransformConfig(height=32, width=16)
CNN_SIZE = TransformConfig(height=64, width=32)


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


def tiny(**kw) -> ModelConfig:
    return ModelConfig(**{**TINY.__dict__, **kw})


@pytest.fixture(scope="module")
def tiny_rn_name(tmp_path_factory):
    """A tiny open_clip ModifiedResNet registered under a model name (as RN50 is)."""
    import open_clip

    d = tmp_path_factory.mktemp("oc_cfg")
    cfg = {"embed_dim": 16, "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 8, "head_width": 8},
           "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}}
    (d / "RN-tiny-test.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(d / "RN-tiny-test.json")
    return "RN-tiny-test"


def hf_dir(tmp_path: Path, projection: bool = True) -> Path:
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    torch.manual_seed(3)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)
    model = (CLIPVisionModelWithProjection if projection else CLIPVisionModel)(config)
    model.save_pretrained(tmp_path / "hf")
    return tmp_path / "hf"


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


def test_pretrained_tag_offline_fails_fast_and_clearly():
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
        build_backbone(ModelConfig(open_clip_model="ViT-B-16", pretrained="openai"), (256, 128))
    with pytest.raises(ConfigError, match="neither a file nor a pretrained tag"):
        build_backbone(ModelConfig(open_clip_model="ViT-B-16", pretrained="no-such-tag"), (256, 128))
    with pytest.raises(ConfigError, match="HF_HUB_OFFLINE"):
        build_backbone(ModelConfig(backbone="hf_clip", pretrained="openai/clip-vit-base-patch16"), (256, 128))
    with pytest.raises(ConfigError, match="model.pretrained: .* is not a file"):
        build_backbone(ModelConfig(backbone="osnet_x0_25", pretrained="/no/such/file.pth"), (64, 32))


def test_openai_tag_selects_quick_gelu():
    from reidscale.models.open_clip_tower import quick_gelu

    assert quick_gelu("ViT-B-16", "openai") and quick_gelu("ViT-B-16-quickgelu", "")
    assert not quick_gelu("ViT-B-16", "") and not quick_gelu("ViT-B-16", "laion2b_s34b_b88k")


# -- every backbone: export → reload is bit-identical ------------------------------------------------

BACKBONES = {
    "open_clip_tiny_vit": (TINY, SIZE),
    "open_clip_vit_olp_sie": (tiny(stride=6, sie_cameras=3, sie_views=2, feature="cls+proj"), SIZE),
    "open_clip_resnet": (None, CNN_SIZE),  # the registered tiny ModifiedResNet, see the test
    "hf_clip": (None, SIZE),
    "resnet50": (ModelConfig(backbone="resnet50"), CNN_SIZE),
    "osnet_x1_0": (ModelConfig(backbone="osnet_x1_0"), CNN_SIZE),
    "osnet_x0_25": (ModelConfig(backbone="osnet_x0_25"), CNN_SIZE),
}


def _config(name, tmp_path, rn_name) -> tuple[ModelConfig, TransformConfig]:
    cfg, size = BACKBONES[name]
    if name == "open_clip_resnet":
        cfg = ModelConfig(open_clip_model=rn_name, feature="cls+proj")
    if name == "hf_clip":
        cfg = ModelConfig(backbone="hf_clip", pretrained=str(hf_dir(tmp_path)), feature="cls+proj")
    return cfg, size


@pytest.mark.parametrize("name", list(BACKBONES))
def test_every_backbone_exports_and_reloads_bit_identically(name, tmp_path, tiny_rn_name):
    cfg, size = _config(name, tmp_path, tiny_rn_name)
    torch.manual_seed(0)
    model = build_reid_model(cfg, size, num_classes=5)
    # one training step moves BN statistics and weights away from their initial values
    x = torch.randn(4, 3, size.height, size.width)
    feat, logits = model(x)
    (feat.square().mean() + logits.square().mean()).backward()
    with torch.no_grad():
        for p in model.parameters():
            if p.grad is not None:
                p -= 0.1 * p.grad
    model.eval()
    out = export_embedding_model(model.embedding, cfg, size, tmp_path / "export")
    loaded, config = load_embedding_model(out)
    kwargs = {"cameras": torch.tensor([0, 1, 2, 0]), "views": torch.tensor([1, 0, 1, 1])} if cfg.sie_cameras else {}
    with torch.no_grad():
        want = model.embedding(x, **kwargs)
        got = loaded(x, **kwargs)
    assert torch.equal(got, want)
    assert got.shape == (4, config["dim"]) and got.dtype == torch.float32
    torch.testing.assert_close(got.norm(dim=1), torch.ones(4))
    assert (got[0] - got[1]).abs().max() > 1e-5


# -- open_clip towers ----------------------------------------------------------------------------------


def _square_clip_state(path: Path, fmt: str) -> dict:
    """A tiny open_clip CLIP trained at 32×32 (a 4×4 grid), saved as a full-model checkpoint."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(1)
    clip = open_clip.CLIP(embed_dim=16, vision_cfg={"image_size": 32, "patch_size": 8, "width": 32, "layers": 1,
                                                    "head_width": 16},
                          text_cfg={"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1})
    state = {k: v.contiguous() for k, v in clip.state_dict().items()}
    save_file(state, str(path)) if fmt == "safetensors" else torch.save(state, path)
    return state


def _reference_resize(pos: torch.Tensor, grid: tuple[int, int], mode: str) -> torch.Tensor:
    img = pos[1:].reshape(1, 4, 4, -1).permute(0, 3, 1, 2)
    img = F.interpolate(img, size=grid, mode=mode, align_corners=False)
    return torch.cat([pos[:1], img.permute(0, 2, 3, 1).reshape(grid[0] * grid[1], -1)])


@pytest.mark.parametrize("fmt", ["pt", "safetensors"])
def test_local_open_clip_checkpoint_arrives_with_positions_interpolated(tmp_path, fmt):
    path = tmp_path / f"clip.{fmt}"
    state = _square_clip_state(path, fmt)
    tower, dim = build_backbone(tiny(pretrained=str(path)), (32, 16))
    assert dim == 16
    assert torch.equal(tower.conv1.weight, state["visual.conv1.weight"])
    assert torch.equal(tower.proj, state["visual.proj"])
    assert torch.equal(tower.transformer.resblocks[0].attn.in_proj_weight,
                       state["visual.transformer.resblocks.0.attn.in_proj_weight"])
    torch.testing.assert_close(tower.positional_embedding,
                               _reference_resize(state["visual.positional_embedding"], (4, 2), "bicubic"))
    # TransReID/CLIP-ReID's bilinear, and the overlapping-patch grid ((32-8)//6+1, (16-8)//6+1) = (5, 2)
    olp, _ = build_backbone(tiny(pretrained=str(path), stride=6, pos_interpolation="bilinear"), (32, 16))
    assert olp.grid == (5, 2) and olp.conv1.stride == (6, 6)
    torch.testing.assert_close(olp.positional_embedding,
                               _reference_resize(state["visual.positional_embedding"], (5, 2), "bilinear"))
    assert olp(torch.randn(2, 3, 32, 16)).shape == (2, 16)


def test_a_reidscale_export_initialises_a_new_model(tmp_path):
    torch.manual_seed(0)
    source = build_reid_model(tiny(sie_cameras=2), SIZE, num_classes=3).embedding
    out = export_embedding_model(source, tiny(sie_cameras=2), SIZE, tmp_path / "export")
    # fine-tuning from an earlier ReID model: its backbone.* weights, the non-square grid kept
    tower, _ = build_backbone(tiny(sie_cameras=2, pretrained=str(out / "model.safetensors")), (32, 16))
    for name, value in tower.state_dict().items():
        assert torch.equal(value, source.backbone.state_dict()[name]), name


def test_a_checkpoint_of_another_architecture_is_refused_naming_the_key(tmp_path):
    path = tmp_path / "clip.pt"
    _square_clip_state(path, "pt")
    with pytest.raises(ConfigError, match="model.pretrained: .* does not fit"):
        build_backbone(tiny(width=64, pretrained=str(path)), (32, 16))
    torch.save({"weights": "not tensors"}, tmp_path / "bad.pt")
    with pytest.raises(ConfigError, match="model.pretrained"):
        build_backbone(tiny(pretrained=str(tmp_path / "bad.pt")), (32, 16))


def test_features_cls_proj_and_their_concatenation():
    torch.manual_seed(0)
    x = torch.randn(3, 3, 32, 16)
    tower, dim = build_backbone(tiny(feature="cls+proj"), (32, 16))
    assert dim == 32 + 16
    cls, proj = tower.features(x)
    torch.testing.assert_close(proj, cls @ tower.proj)
    torch.testing.assert_close(tower(x), torch.cat([cls, proj], dim=1))
    tower.feature = "cls"
    assert tower.dim == 32 and torch.equal(tower(x), cls)


@pytest.mark.parametrize("tokens", ["all", "cls"])
def test_sie_adds_a_per_camera_embedding_scaled_by_lambda(tokens):
    torch.manual_seed(0)
    tower, _ = build_backbone(tiny(sie_cameras=4, sie_lambda=2.0, sie_tokens=tokens), (32, 16))
    tower.eval()
    x = torch.randn(1, 3, 32, 16).expand(3, -1, -1, -1)
    plain = tower(x)
    out = tower(x, cameras=torch.tensor([1, 1, 2]))
    torch.testing.assert_close(out[0], out[1])
    assert (out[1] - out[2]).abs().max() > 1e-4 and (out[0] - plain[0]).abs().max() > 1e-4
    # the side information is λ·e[camera] added to the tokens before ln_pre
    side = tower.side_embedding(torch.tensor([2]), None)
    torch.testing.assert_close(side, 2.0 * tower.sie_embed[2:3])
    with torch.no_grad():
        tower.sie_embed.zero_()
    torch.testing.assert_close(tower(x, cameras=torch.tensor([1, 1, 2])), plain)


def test_cameras_reach_the_backbone_through_the_reid_model():
    torch.manual_seed(0)
    model = build_reid_model(tiny(sie_cameras=2), SIZE, num_classes=3).eval()
    x = torch.randn(1, 3, 32, 16).expand(2, -1, -1, -1)
    feat, _ = model(x, cameras=torch.tensor([0, 1]))
    assert (feat[0] - feat[1]).abs().max() > 1e-4
    emb = model.embedding(x, cameras=torch.tensor([0, 1]))
    assert (emb[0] - emb[1]).abs().max() > 1e-4


def test_open_clip_resnet_runs_non_square_with_interpolated_attention_pool(tiny_rn_name):
    tower, dim = build_backbone(ModelConfig(open_clip_model=tiny_rn_name, feature="cls+proj"), (64, 32))
    assert tower.attnpool.positional_embedding.shape[0] == 1 + 2 * 1
    assert dim == 8 * 32 + 16 and tower(torch.randn(2, 3, 64, 32)).shape == (2, dim)
    with pytest.raises(ConfigError, match="SIE need a ViT"):
        build_backbone(ModelConfig(open_clip_model=tiny_rn_name, sie_cameras=2), (64, 32))


def test_clip_image_tower_shares_weights_and_old_raw_tower_exports_still_load(tmp_path):
    from reidscale.models.open_clip_tower import wrap_tower
    from reidscale.models.prompt_learner import build_clip

    torch.manual_seed(0)
    clip = build_clip(TINY, (32, 16))
    tower = wrap_tower(clip.visual, TINY, (32, 16))
    assert tower.conv1.weight is clip.visual.conv1.weight and tower.proj is clip.visual.proj
    x = torch.randn(2, 3, 32, 16)
    torch.testing.assert_close(tower(x), clip.visual(x))
    # the CLIP-ReID recipe exports the bare open_clip tower; it reloads as an OpenClipViT
    raw = EmbeddingModel(clip.visual, 16).eval()
    loaded, _ = load_embedding_model(export_embedding_model(raw, TINY, SIZE, tmp_path / "raw"))
    assert torch.equal(loaded(x), raw(x))


# -- Hugging Face CLIP ---------------------------------------------------------------------------------


def test_hf_clip_loads_a_save_pretrained_directory_and_interpolates_positions(tmp_path):
    from transformers import CLIPVisionModelWithProjection

    directory = hf_dir(tmp_path)
    reference = CLIPVisionModelWithProjection.from_pretrained(directory).eval()
    tower, dim = build_backbone(ModelConfig(backbone="hf_clip", pretrained=str(directory)), (32, 16))
    assert dim == 16
    assert torch.equal(tower.visual_projection.weight, reference.visual_projection.weight)
    x = torch.randn(2, 3, 32, 16)  # a 4×2 grid from the 4×4 pretrained table
    with torch.no_grad():
        want = reference(pixel_values=x, interpolate_pos_encoding=True).image_embeds
        torch.testing.assert_close(tower.eval()(x), want)
    with pytest.raises(ConfigError, match="feature=cls"):
        build_backbone(ModelConfig(backbone="hf_clip", pretrained=str(hf_dir(tmp_path / "p", projection=False))),
                       (32, 16))


# -- CNN baselines -------------------------------------------------------------------------------------


def test_resnet50_last_stride_one_doubles_the_final_map_and_loads_torchvision_weights(tmp_path):
    from torchvision.models import resnet50

    torch.manual_seed(0)
    reference = resnet50()
    torch.save(reference.state_dict(), tmp_path / "r50.pth")  # with its ImageNet fc, which is ignored
    model, dim = build_backbone(ModelConfig(backbone="resnet50", pretrained=str(tmp_path / "r50.pth")), (64, 32))
    assert dim == 2048
    assert torch.equal(model.layer3[0].conv1.weight, reference.layer3[0].conv1.weight)
    assert torch.equal(model.bn1.running_var, reference.bn1.running_var)

    def final_map(m, x):
        return m.layer4(m.layer3(m.layer2(m.layer1(m.maxpool(m.relu(m.bn1(m.conv1(x))))))))

    x = torch.randn(1, 3, 64, 32)
    assert final_map(model, x).shape[-2:] == (4, 2)  # stride 16
    stride2, _ = build_backbone(ModelConfig(backbone="resnet50", last_stride=2), (64, 32))
    assert final_map(stride2, x).shape[-2:] == (2, 1)


def test_osnet_parameter_counts_match_the_paper():
    from reidscale.models.osnet import OSNet

    counts = {w: sum(p.numel() for p in OSNet(w).parameters()) for w in (1.0, 0.25)}
    assert 2.1e6 < counts[1.0] < 2.25e6  # paper: 2.2M
    assert 0.15e6 < counts[0.25] < 0.25e6  # paper: 0.2M
    block = OSNet(1.0).conv2[0]
    # T=4 streams of 1..4 Lite 3×3 convs, one aggregation gate shared by all of them
    assert [len(list(s.modules())) for s in (block.conv2a, block.conv2b, block.conv2c, block.conv2d)] == [5, 11, 16, 21]
    assert sum(1 for m in block.modules() if type(m).__name__ == "AggregationGate") == 1


def test_osnet_loads_a_checkpoint_with_an_imagenet_classifier(tmp_path):
    from reidscale.models.osnet import OSNet

    torch.manual_seed(0)
    source = OSNet(0.25)
    state = {**source.state_dict(), "classifier.weight": torch.randn(1000, 512), "classifier.bias": torch.zeros(1000)}
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "osnet.pth.tar")
    model, _ = build_backbone(ModelConfig(backbone="osnet_x0_25", pretrained=str(tmp_path / "osnet.pth.tar")), (64, 32))
    for (name, a), b in zip(model.state_dict().items(), source.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("backbone", ["osnet_x0_25", "resnet50"])
def test_cnn_batch_norm_trains_with_bf16_weights_and_fp32_statistics(backbone):
    # what DeepSpeed's bf16 mode does: parameters cast to bf16, buffers (running statistics) kept fp32
    model, _ = build_backbone(ModelConfig(backbone=backbone), (64, 32))
    for p in model.parameters():
        p.data = p.data.bfloat16()
    out = model(torch.randn(2, 3, 64, 32, dtype=torch.bfloat16))
    out.float().sum().backward()
    bn = model.bn1 if backbone == "resnet50" else model.conv1.bn
    assert out.dtype == torch.bfloat16 and bn.running_mean.dtype == torch.float32
    assert bn.running_mean.abs().sum() > 0  # the statistics were updated
    assert all(p.grad is not None for p in model.parameters())


# -- classifiers ---------------------------------------------------------------------------------------


def test_partial_fc_scores_all_positives_and_a_sample_rate_share_of_centres():
    torch.manual_seed(0)
    head = PartialFC(8, 1000, sample_rate=0.1, scale=30.0, margin=0.2)
    feat, labels = torch.randn(6, 8), torch.tensor([7, 7, 500, 999, 3, 500])
    logits = head(feat, labels)
    targets = sampled_targets(labels)
    assert logits.shape == (6, 100)
    assert targets.tolist() == [1, 1, 2, 3, 0, 2]
    # the target column is the true class: scale·(cos(feature, centre) − margin), the plain formula
    cos = F.cosine_similarity(feat, head.weight[labels], dim=1)
    torch.testing.assert_close(logits[torch.arange(6), targets], 30.0 * (cos - 0.2))
    # every other column is a distinct non-positive centre (no margin)
    index = head.sample(labels)
    assert len(set(index.tolist())) == 100 and set(index[:4].tolist()) == {3, 7, 500, 999}


def test_partial_fc_at_full_rate_is_the_cosine_softmax_over_all_classes():
    torch.manual_seed(0)
    head = PartialFC(8, 50, sample_rate=1.0, scale=16.0)
    feat, labels = torch.randn(10, 8), torch.randint(0, 50, (10,))
    loss = F.cross_entropy(head(feat, labels), sampled_targets(labels))
    reference = 16.0 * F.normalize(feat, dim=1) @ F.normalize(head.weight, dim=1).t()
    torch.testing.assert_close(loss, F.cross_entropy(reference, labels))
    torch.testing.assert_close(head(feat), reference)  # without labels: every class, in order


def test_partial_fc_gradient_reaches_only_the_sampled_centres():
    torch.manual_seed(0)
    head = PartialFC(8, 200, sample_rate=0.05)
    labels = torch.tensor([1, 2, 2, 150])
    F.cross_entropy(head(torch.randn(4, 8), labels), sampled_targets(labels)).backward()
    touched = head.weight.grad.abs().sum(1).nonzero().flatten()
    assert len(touched) == 10 and {1, 2, 150} <= set(touched.tolist())


def test_partial_fc_shards_partition_the_classes():
    shards = [PartialFC(4, 1003, rank=r, world=4) for r in range(4)]
    assert [s.class_start for s in shards] == [0, 250, 501, 752]
    assert sum(s.num_local for s in shards) == 1003


def test_reid_model_returns_targets_when_given_labels():
    cfg = tiny(classifier="partial_fc", sample_rate=0.25)
    model = build_reid_model(cfg, SIZE, num_classes=40)
    x, labels = torch.randn(4, 3, 32, 16), torch.tensor([5, 5, 9, 30])
    feat, logits, targets = model(x, labels=labels)
    assert logits.shape == (4, 10) and targets.tolist() == [0, 0, 1, 2]
    feat, logits = model(x)
    assert logits.shape == (4, 40)
    linear = build_reid_model(TINY, SIZE, num_classes=40)
    _, logits, targets = linear(x, labels=labels)
    assert logits.shape == (4, 40) and torch.equal(targets, labels)
    # the hard-negative sampler reads class centres from classifier.weight
    assert model.classifier.weight.shape == linear.classifier.weight.shape == (40, 16)


def test_classifier_memory_arithmetic_for_a_million_identities():
    full = memory_bytes(1_000_000, 512, 64)
    partial = memory_bytes(1_000_000, 512, 64, sample_rate=0.1)
    assert full["centres"] == 2_048_000_000 and full["logits"] == 64 * 1_000_000 * 4 * 3
    assert partial["logits"] * 10 == full["logits"]
    sharded = memory_bytes(1_000_000, 512, 64, sample_rate=0.1, world=8)
    assert sharded["centres"] == 256_000_000


# -- ONNX ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["open_clip_vit_olp_sie", "hf_clip", "osnet_x0_25"])
def test_onnx_export_matches_torch_on_random_crops(name, tmp_path, tiny_rn_name):
    pytest.importorskip("onnx", reason="ONNX export needs the onnx package")
    pytest.importorskip("onnxscript", reason="torch's ONNX exporter needs onnxscript")
    pytest.importorskip("onnxruntime", reason="the parity check runs the graph with onnxruntime")
    from reidscale.models.export import export_onnx, onnx_inputs, onnx_parity

    cfg, size = _config(name, tmp_path, tiny_rn_name)
    torch.manual_seed(0)
    model = build_reid_model(cfg, size, num_classes=5).embedding.eval()
    path = export_onnx(model, tmp_path / "model.onnx", (size.height, size.width))
    names = onnx_inputs(model)
    # a batch size other than the export's, random crops of real-image statistics
    images = torch.rand(5, 3, size.height, size.width) * 2 - 1
    inputs = [images] + [torch.tensor([0, 1, 2, 1, 0]) if n == "cameras" else torch.tensor([1, 0, 1, 0, 0])
                         for n in names[1:]]
    assert onnx_parity(model, path, inputs) < 1e-4
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})
    assert out.shape == (5, model.dim)
    assert abs(out[0] - out[1]).max() > 1e-4  # different crops, different embeddings


# -- configs -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("override, key", [
    ("model.backbone=vgg16", "model.backbone"),
    ("model.stride=12", "model.stride"),
    ("model.feature=cls", "model.feature"),
    ("model.sample_rate=0", "model.sample_rate"),
])
def test_bad_model_configs_are_refused_naming_the_key(override, key):
    from reidscale.train.config import TrainJobConfig

    # stride and feature are refused for a CNN backbone
    extra = ["model.backbone=osnet_x0_25"] if override.split("=")[0] in ("model.stride", "model.feature") else []
    with pytest.raises(ConfigError, match=key):
        load_config(TrainJobConfig, None, extra + [override])


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "models").glob("*.yaml")), ids=lambda p: p.name)
def test_model_config_files_load(path):
    from reidscale.train.config import TrainJobConfig

    load_config(TrainJobConfig, path)
