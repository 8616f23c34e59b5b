"""Image backbones: open_clip image towers, by name (with pretrained weights) or tiny.

``build_backbone`` returns a module mapping N×3×H×W float images to N×D features and
the feature dimension D. A named open_clip model (``ViT-B-16``) takes its pretrained
weights from an open_clip tag (``openai``) or a local checkpoint path; a tiny
random-initialised ViT is the default so that tests and the demo run on a CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from reidscale.config import ConfigError


@dataclass
class ModelConfig:
    # open_clip model name (e.g. "ViT-B-16"); empty builds the tiny ViT below
    open_clip_model: str = ""
    # open_clip pretrained tag ("openai", "laion2b_s34b_b88k") or a local checkpoint file
    pretrained: str = ""
    # tiny ViT (used when open_clip_model is empty)
    width: int = 128
    layers: int = 4
    heads: int = 4
    patch_size: int = 8
    embed_dim: int = 128
    mlp_ratio: float = 4.0

    def validate(self) -> None:
        if not self.open_clip_model:
            if self.width % self.heads:
                raise ConfigError(f"width: {self.width} is not divisible by heads={self.heads}")
            for name in ("width", "layers", "heads", "patch_size", "embed_dim"):
                if getattr(self, name) < 1:
                    raise ConfigError(f"{name}: must be >= 1")
        if self.pretrained and not self.open_clip_model:
            raise ConfigError("pretrained: needs open_clip_model (pretrained weights belong to a named model)")


def _tiny_vit(cfg: ModelConfig, image_size: tuple[int, int]) -> nn.Module:
    from open_clip.transformer import VisionTransformer

    h, w = image_size
    if h % cfg.patch_size or w % cfg.patch_size:
        raise ConfigError(f"model.patch_size: {cfg.patch_size} does not divide the image size {h}x{w}")
    return VisionTransformer(
        image_size=(h, w),
        patch_size=cfg.patch_size,
        width=cfg.width,
        layers=cfg.layers,
        heads=cfg.heads,
        mlp_ratio=cfg.mlp_ratio,
        output_dim=cfg.embed_dim,
    )


def _named_open_clip(cfg: ModelConfig, image_size: tuple[int, int]) -> tuple[nn.Module, int]:
    import open_clip

    pretrained = cfg.pretrained or None
    if pretrained and not Path(pretrained).is_file():
        known = {tag for name, tag in open_clip.list_pretrained() if name == cfg.open_clip_model}
        if pretrained not in known:
            raise ConfigError(
                f"model.pretrained: {pretrained!r} is neither a file nor a pretrained tag of "
                f"{cfg.open_clip_model} (tags: {sorted(known)})"
            )
        if os.environ.get("HF_HUB_OFFLINE") == "1":
            raise ConfigError(
                f"model.pretrained: {cfg.open_clip_model}/{pretrained} must be downloaded but HF_HUB_OFFLINE=1; "
                "pass a local checkpoint file instead"
            )
    model = open_clip.create_model(
        cfg.open_clip_model, pretrained=pretrained, force_image_size=image_size, weights_only=True
    )
    visual = model.visual
    return visual, int(visual.output_dim)


def build_backbone(cfg: ModelConfig, image_size: tuple[int, int]) -> tuple[nn.Module, int]:
    """(module, feature_dim) for images of ``image_size`` = (height, width)."""
    if cfg.open_clip_model:
        return _named_open_clip(cfg, image_size)
    return _tiny_vit(cfg, image_size), cfg.embed_dim
