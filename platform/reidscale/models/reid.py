"""ReID head (BNNeck), the training model, and the exported embedding model.

BNNeck (Luo et al., "Bag of Tricks", 2019): the triplet loss sees the backbone feature,
the ID classifier sees its batch-normalised version, and the normalised feature is the
embedding used at test time. The classifier exists only for training and is never
exported.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from reidscale.data.transforms import TransformConfig
from reidscale.models.backbone import ModelConfig, build_backbone

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
    """Images N×3×H×W → L2-normalised embeddings N×D (float32)."""

    def __init__(self, backbone: nn.Module, dim: int):
        super().__init__()
        self.backbone = backbone
        self.neck = BNNeck(dim)
        self.dim = dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.neck(self.backbone(images)).float(), dim=1)


class ReIDModel(nn.Module):
    """Training model: backbone + BNNeck + ID classifier."""

    def __init__(self, backbone: nn.Module, dim: int, num_classes: int):
        super().__init__()
        self.embedding = EmbeddingModel(backbone, dim)
        self.classifier = nn.Linear(dim, num_classes, bias=False)
        nn.init.normal_(self.classifier.weight, std=0.001)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(backbone feature for metric losses, logits for the ID loss)."""
        feat = self.embedding.backbone(images)
        logits = self.classifier(self.embedding.neck(feat))
        return feat, logits


def build_reid_model(model_cfg: ModelConfig, transform_cfg: TransformConfig, num_classes: int) -> ReIDModel:
    backbone, dim = build_backbone(model_cfg, (transform_cfg.height, transform_cfg.width))
    return ReIDModel(backbone, dim, num_classes)


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
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(f".{out_dir.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    # exports are fp32 whatever the training precision (bf16 under DeepSpeed): one format to load
    state = {k: (v.detach().float() if v.is_floating_point() else v.detach()).cpu().contiguous()
             for k, v in model.state_dict().items()}
    save_file(state, str(tmp / "model.safetensors"))
    config = {
        "format": EXPORT_FORMAT,
        "model": asdict(model_cfg),
        "transform": asdict(transform_cfg),
        "dim": model.dim,
        "weights_sha256": state_hash(state),
        **(extra or {}),
    }
    (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
    if out_dir.exists():
        old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
    return out_dir


def load_embedding_model(path: str | Path) -> tuple[EmbeddingModel, dict]:
    """(model in eval mode, its config dict) from an export directory."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path}: no config.json; not an exported embedding model")
    config = json.loads(config_file.read_text())
    if config.get("format") != EXPORT_FORMAT:
        raise ValueError(f"{config_file}: format {config.get('format')!r}, expected {EXPORT_FORMAT!r}")
    model_cfg = ModelConfig(**config["model"])
    tcfg = config["transform"]
    transform_cfg = TransformConfig(**{**tcfg, "mean": tuple(tcfg["mean"]), "std": tuple(tcfg["std"])})
    # the export carries the weights, so never fetch pretrained ones while rebuilding
    model_cfg.pretrained = ""
    backbone, dim = build_backbone(model_cfg, (transform_cfg.height, transform_cfg.width))
    model = EmbeddingModel(backbone, dim)
    model.load_state_dict(load_file(str(path / "model.safetensors")), strict=True)
    model.eval()
    config["transform_config"] = transform_cfg
    return model, config
