"""Hugging Face transformers' CLIP image tower (``CLIPVisionModel[WithProjection]``).

``model.pretrained`` is a local directory in ``save_pretrained`` layout (a full ``CLIPModel``
or a vision model alone), or a hub id that is only read from the local cache when
HF_HUB_OFFLINE=1. The position table stays at its pretrained square grid and is
interpolated (bicubic) on every forward (``interpolate_pos_encoding=True``), which is how
transformers runs CLIP at 256×128. Features as for open_clip towers: ``cls`` (the class
token after the last LayerNorm), ``proj`` (its projection) or ``cls+proj``. Overlapping
patches and SIE are open_clip-only.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from reidscale.config import ConfigError


class HFClipVision(nn.Module):
    def __init__(self, model: nn.Module, feature: str):
        super().__init__()
        self.vision_model = model.vision_model
        # only when used: a parameter without gradients upsets some ZeRO stages
        self.visual_projection = model.visual_projection if feature != "cls" else None
        self.feature = feature
        self.width = model.config.hidden_size
        self.output_dim = getattr(model.config, "projection_dim", 0) if feature != "cls" else 0

    @property
    def dim(self) -> int:
        return {"proj": self.output_dim, "cls": self.width, "cls+proj": self.width + self.output_dim}[self.feature]

    uses_side_info = False

    def export_config(self) -> dict:
        """What rebuilds this architecture without the original directory (kept in the export)."""
        return {"hf_vision_config": self.vision_model.config.to_dict()}

    def features(self, images: torch.Tensor, cameras=None, views=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        out = self.vision_model(pixel_values=images, interpolate_pos_encoding=True)
        cls = out.pooler_output
        return cls, (self.visual_projection(cls) if self.visual_projection is not None else None)

    def forward(self, images: torch.Tensor, cameras=None, views=None) -> torch.Tensor:
        cls, proj = self.features(images)
        if self.feature == "cls":
            return cls
        return proj if self.feature == "proj" else torch.cat([cls, proj], dim=1)


def build_hf_clip(cfg, image_size: tuple[int, int], *, load_weights: bool = True,
                  arch: dict | None = None) -> tuple[nn.Module, int]:
    """(tower, dim) from ``cfg.pretrained`` (weights and architecture), or from ``arch`` (an
    export's ``backbone_config``, random init: the export's weights follow)."""
    from transformers import CLIPVisionConfig, CLIPVisionModel, CLIPVisionModelWithProjection

    cls = CLIPVisionModel if cfg.feature == "cls" else CLIPVisionModelWithProjection
    if arch is not None and (not load_weights or not cfg.pretrained):
        model = cls(CLIPVisionConfig.from_dict(arch["hf_vision_config"]))
    elif not cfg.pretrained:
        raise ConfigError("model.pretrained: the hf_clip backbone needs a directory in save_pretrained layout")
    else:
        source = cfg.pretrained
        local = Path(source).is_dir()
        if not local and os.environ.get("HF_HUB_OFFLINE") == "1" and not _in_cache(source):
            raise ConfigError(f"model.pretrained: {source!r} is not a directory and HF_HUB_OFFLINE=1 (not in the local "
                              "cache); pass a save_pretrained directory")
        try:
            model, info = cls.from_pretrained(source, output_loading_info=True, local_files_only=local)
        except OSError as exc:
            raise ConfigError(f"model.pretrained: {source} is not a loadable CLIP checkpoint: {exc}") from None
        missing = list(info.get("missing_keys", []))
        if missing:
            hint = "; model.feature=cls needs no projection" if any("projection" in k for k in missing) else ""
            raise ConfigError(f"model.pretrained: {source} lacks {missing[:4]}{hint}")
    tower = HFClipVision(model, cfg.feature)
    return tower, tower.dim


def _in_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
