"""ReID head (BNNeck), the training model, and the exported embedding model.

BNNeck (Luo et al., "Bag of Tricks", 2019): the triplet loss sees the backbone feature,
the ID classifier sees its batch-normalised version, and the normalised feature is the
embedding used at test time. The classifier exists only for training and is never
exported.

Camera/view ids (for backbones with SIE) travel as optional keyword tensors,
``model(images, cameras=..., views=...)``; without them no side information is added.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from reidscale import atomic
from reidscale.data.transforms import TransformConfig
from reidscale.models import exported
from reidscale.models.backbone import ModelConfig, build_backbone
from reidscale.models.classifier import LinearClassifier, PartialFC, sampled_targets
from reidscale.models.sharded_fc import NeckOutput

EXPORT_FORMAT = "reidscale-embedding-v1"


class BNNeck(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.bn = nn.BatchNorm1d(dim)
        # no shift: keeps the normalised feature centred, as in the BoT recipe
        self.bn.bias.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # statistics in fp32 whatever the compute dtype: DeepSpeed's bf16 mode casts the BN
        # weights but keeps the running buffers fp32, and batch_norm refuses mixed dtypes
        bn = self.bn
        use_batch = bn.training or bn.running_mean is None
        out = F.batch_norm(x.float(), bn.running_mean, bn.running_var, bn.weight.float(), bn.bias.float(),
                           use_batch, bn.momentum if bn.momentum is not None else 0.0, bn.eps)
        if bn.training and bn.num_batches_tracked is not None:
            bn.num_batches_tracked.add_(1)
        return out.to(x.dtype)


class EmbeddingModel(nn.Module):
    """Images N×3×H×W (+ optional camera/view ids, N ints) → L2-normalised embeddings N×D (float32)."""

    def __init__(self, backbone: nn.Module, dim: int):
        super().__init__()
        self.backbone = backbone
        self.neck = BNNeck(dim)
        self.dim = dim

    def features(self, images: torch.Tensor, cameras: torch.Tensor | None = None,
                 views: torch.Tensor | None = None) -> torch.Tensor:
        """The backbone feature (before the BNNeck)."""
        if cameras is None and views is None:
            return self.backbone(images)  # also any plain module, e.g. a bare open_clip tower
        return self.backbone(images, cameras=cameras, views=views)

    def forward(self, images: torch.Tensor, cameras: torch.Tensor | None = None,
                views: torch.Tensor | None = None) -> torch.Tensor:
        return F.normalize(self.neck(self.features(images, cameras, views)).float(), dim=1)


class ReIDModel(nn.Module):
    """Training model: backbone + BNNeck + ID classifier (linear unless one is given)."""

    def __init__(self, backbone: nn.Module, dim: int, num_classes: int, classifier: nn.Module | None = None):
        super().__init__()
        self.embedding = EmbeddingModel(backbone, dim)
        self.classifier = classifier if classifier is not None else LinearClassifier(dim, num_classes)

    def forward(self, images: torch.Tensor, labels: torch.Tensor | None = None, cameras: torch.Tensor | None = None,
                views: torch.Tensor | None = None):
        """``(feat, logits)``: the backbone feature for metric losses and ID logits over every
        class (targets: the labels). With ``labels`` given, ``(feat, logits, targets)``: a
        Partial FC classifier then scores only its sampled centres and ``targets`` are the
        columns to use in the ID loss (for the linear classifier they are the labels)."""
        feat = self.embedding.features(images, cameras, views)
        neck = self.embedding.neck(feat)
        if labels is None:
            return feat, self.classifier(neck)
        logits = self.classifier(neck, labels)
        targets = sampled_targets(labels) if isinstance(self.classifier, PartialFC) else labels
        return feat, logits, targets


def build_classifier(model_cfg: ModelConfig, dim: int, num_classes: int) -> nn.Module:
    """The ID classifier named by ``model.classifier``, holding every class centre.

    Under data parallelism (one DeepSpeed engine per worker) every worker holds the *whole*
    centre table and Partial FC samples per step on each worker (its batch's identities + a
    random ``sample_rate`` share of the others). Sharding the table by rank
    (``PartialFC(rank=, world=)``) is not safe here: DeepSpeed all-reduces (averages) every
    parameter's gradient across workers, which would mix rows of different classes and,
    with ZeRO, partition the shard again. A sharded table needs model parallelism outside
    the engine (see models/classifier.py); bench/partial_fc_memory.py gives what each
    layout costs per worker.
    """
    if model_cfg.shard_classifier:
        return NeckOutput()  # the centres live in train.engine.build_sharded_head, outside the model
    if model_cfg.classifier == "partial_fc":
        return PartialFC(dim, num_classes, sample_rate=model_cfg.sample_rate, scale=model_cfg.cosine_scale,
                         margin=model_cfg.cosine_margin)
    return LinearClassifier(dim, num_classes)


def build_reid_model(model_cfg: ModelConfig, transform_cfg: TransformConfig, num_classes: int) -> ReIDModel:
    backbone, dim = build_backbone(model_cfg, (transform_cfg.height, transform_cfg.width))
    return ReIDModel(backbone, dim, num_classes, build_classifier(model_cfg, dim, num_classes))


def side_inputs(model: nn.Module, cameras, device=None) -> dict[str, torch.Tensor]:
    """``model(images, **side_inputs(model, cameras))``: the camera ids (N ints, numpy or
    torch) as the SIE backbone of ``model`` (an EmbeddingModel or ReIDModel) wants them, or
    {} for a backbone without SIE, so training, validation and embedding agree.

    Raises ValueError naming ``model.sie_cameras`` when an id is outside ``[0, sie_cameras)``
    (an unknown camera is -1 in the shards, which would silently index the last row), and
    naming ``model.sie_views`` for view SIE: the shards carry no view ids.
    """
    embedding = model.embedding if isinstance(model, ReIDModel) else model
    backbone = embedding.backbone
    if not getattr(backbone, "uses_side_info", False):
        return {}
    if getattr(backbone, "sie_views", 0):
        raise ValueError("model.sie_views: the data has no view ids; use sie_cameras only")
    n = backbone.sie_cameras
    if cameras is None:
        raise ValueError(f"model.sie_cameras: {n}, but the batch has no camera ids")
    if not isinstance(cameras, torch.Tensor):
        cameras = torch.from_numpy(np.array(cameras, dtype=np.int64))  # a copy: batches may be read-only
    if len(cameras) and (int(cameras.min()) < 0 or int(cameras.max()) >= n):
        raise ValueError(f"model.sie_cameras: {n}, but the data has camera ids {int(cameras.min())}.."
                         f"{int(cameras.max())}; SIE needs every id in [0, {n})")
    return {"cameras": cameras.to(device=device, dtype=torch.int64)}


def state_hash(state: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(state):
        digest.update(name.encode())
        digest.update(state[name].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def export_embedding_model(
    model: EmbeddingModel,
    model_cfg: ModelConfig,
    transform_cfg: TransformConfig,
    out_dir: str | Path,
    extra: dict | None = None,
) -> Path:
    """Write ``model.safetensors`` + ``config.json`` into ``out_dir`` atomically.

    The directory is built under a temporary name and renamed into place, so a reader
    never sees a half-written export.
    """
    # exports are fp32 whatever the training precision (bf16 under DeepSpeed): one format to load
    state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
             for k, v in model.state_dict().items()}
    config = {
        "format": EXPORT_FORMAT,
        "model": asdict(model_cfg),
        "transform": asdict(transform_cfg),
        "dim": model.dim,
        "weights_sha256": state_hash(state),
        **(extra or {}),
    }
    if hasattr(model.backbone, "export_config"):
        # architecture the config alone does not name (hf_clip's CLIPVisionConfig)
        config["backbone_config"] = model.backbone.export_config()

    def build(tmp: Path) -> None:
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))

    return atomic.replace_dir(out_dir, build)


def load_embedding_model(path: str | Path) -> tuple[EmbeddingModel, dict]:
    """(model in eval mode, its config dict) from an export directory."""
    path = Path(path)
    config_file = path / "config.json"
    config = exported.read_export_config(path)
    if config.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{config_file}: format {config.get('format')!r}, expected {EXPORT_FORMAT!r}")
    model_cfg = ModelConfig(**config["model"])
    tcfg = config["transform"]
    transform_cfg = TransformConfig(**{**tcfg, "mean": tuple(tcfg["mean"]), "std": tuple(tcfg["std"])})
    # the export carries the weights, so never fetch pretrained ones while rebuilding
    backbone, dim = build_backbone(model_cfg, (transform_cfg.height, transform_cfg.width), load_weights=False,
                                   arch=config.get("backbone_config"))
    model = EmbeddingModel(backbone, dim)
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    model.eval()
    config["transform_config"] = transform_cfg
    return model, config
