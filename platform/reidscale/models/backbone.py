"""Image backbones, chosen by ``model.backbone``: one constructor per name, all returning
``(module, feature_dim)``; the module maps N×3×H×W float images to N×D features.

- ``open_clip``: an open_clip ViT or ResNet image tower, ``model.open_clip_model`` by name
  (``ViT-B-16``, ``RN50``, ...), or the tiny ViT below when the name is empty (tests, CPU
  demo); pretrained = an open_clip tag (``openai``) or a local checkpoint file.
- ``hf_clip``: transformers' ``CLIPVisionModel[WithProjection]``; pretrained = a
  ``save_pretrained`` directory.
- ``resnet50``: torchvision ResNet-50, last stride ``model.last_stride``, average pooled (BoT);
  pretrained = a local checkpoint file.
- ``osnet_x1_0``, ``osnet_x0_75``, ``osnet_x0_5``, ``osnet_x0_25``: OSNet at width ×1 … ×0.25;
  pretrained = a local checkpoint file.

Local checkpoint files are safetensors or ``torch.load(weights_only=True)`` files; nothing is
downloaded when HF_HUB_OFFLINE=1, and a missing download fails at once naming the key.
Backbones that use side information (SIE) take ``cameras=``/``views=`` keyword tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from torch import nn

from reidscale.config import ConfigError

BACKBONES = ("open_clip", "hf_clip", "resnet50", "osnet_x1_0", "osnet_x0_75", "osnet_x0_5", "osnet_x0_25")


@dataclass
class ModelConfig:
    backbone: Literal["open_clip", "hf_clip", "resnet50", "osnet_x1_0", "osnet_x0_75", "osnet_x0_5",
                      "osnet_x0_25"] = "open_clip"
    # open_clip model name (e.g. "ViT-B-16", "ViT-B-16-quickgelu", "RN50"); empty builds the tiny ViT below
    open_clip_model: str = ""
    # open_clip: a pretrained tag ("openai", "laion2b_s34b_b88k") or a local checkpoint file;
    # hf_clip: a save_pretrained directory; resnet50/osnet_*: a local checkpoint file
    pretrained: str = ""
    # tiny ViT (open_clip with open_clip_model empty)
    width: int = 128
    layers: int = 4
    heads: int = 4
    patch_size: int = 8
    embed_dim: int = 128
    mlp_ratio: float = 4.0
    # test-time/metric feature of CLIP towers: the projected class token, the class token before
    # projection, or both concatenated (CLIP-ReID's test feature)
    feature: Literal["proj", "cls", "cls+proj"] = "proj"
    # open_clip ViT: patch-embedding stride; 0 = the patch size (no overlap); TransReID's OLP: 12 for 16-px patches
    stride: int = 0
    # interpolation of pretrained position tables to this input's grid (TransReID/CLIP-ReID code: bilinear)
    pos_interpolation: Literal["bicubic", "bilinear"] = "bicubic"
    # open_clip ViT side-information embedding: number of cameras / views (0: off); λ; which tokens get it
    # (TransReID: all tokens, λ=3; CLIP-ReID: the class token, λ=1)
    sie_cameras: int = 0
    sie_views: int = 0
    sie_lambda: float = 3.0
    sie_tokens: Literal["all", "cls"] = "all"
    # resnet50: stride of the last stage (BoT: 1)
    last_stride: int = 1
    # ID classifier (training only, never exported): linear (BoT) or partial_fc (cosine logits
    # over the batch's classes + a random `sample_rate` share of the others; sample_rate=1: full cosine)
    classifier: Literal["linear", "partial_fc"] = "linear"
    sample_rate: float = 0.1
    cosine_scale: float = 30.0
    cosine_margin: float = 0.0
    # partial_fc only: each train worker holds the centres of its own contiguous range of
    # identities (outside the DeepSpeed engine, its own optimizer; softmax exact across workers)
    # instead of a copy of the whole table: memory per worker / num_workers (docs/scaling.md).
    # recipe=clipreid: the per-identity prompt tokens (stage 1) and text features (stage 2's
    # i2t) are sharded over the same ranges (models/sharded_prompts.py)
    shard_classifier: bool = False

    def validate(self) -> None:
        if self.backbone == "open_clip" and not self.open_clip_model:
            if self.width % self.heads:
                raise ConfigError(f"width: {self.width} is not divisible by heads={self.heads}")
            for name in ("width", "layers", "heads", "patch_size", "embed_dim"):
                if getattr(self, name) < 1:
                    raise ConfigError(f"{name}: must be >= 1")
        if self.backbone != "open_clip" and self.open_clip_model:
            raise ConfigError(f"open_clip_model: set, but backbone is {self.backbone}")
        for name in ("stride", "sie_cameras", "sie_views"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name}: must be >= 0")
            if getattr(self, name) and self.backbone != "open_clip":
                raise ConfigError(f"{name}: overlapping patches and SIE are open_clip ViT options, not {self.backbone}")
        if self.sie_lambda <= 0:
            raise ConfigError("sie_lambda: must be > 0")
        if self.feature != "proj" and self.backbone not in ("open_clip", "hf_clip"):
            raise ConfigError(f"feature: {self.backbone} has one pooled feature; cls/cls+proj are for CLIP towers")
        if self.backbone == "hf_clip" and not self.pretrained:
            raise ConfigError("pretrained: the hf_clip backbone needs a save_pretrained directory")
        if self.last_stride not in (1, 2):
            raise ConfigError(f"last_stride: {self.last_stride} is not 1 or 2")
        if not 0.0 < self.sample_rate <= 1.0:
            raise ConfigError(f"sample_rate: {self.sample_rate} is not in (0, 1]")
        if self.cosine_scale <= 0 or self.cosine_margin < 0:
            raise ConfigError("cosine_scale: must be > 0, cosine_margin: >= 0")
        if self.shard_classifier and self.classifier != "partial_fc":
            raise ConfigError(f"shard_classifier: shards Partial FC's centres; set classifier=partial_fc "
                              f"(it is {self.classifier!r})")


def _open_clip(cfg, size, load_weights, arch):
    from reidscale.models.open_clip_tower import build_open_clip_tower

    return build_open_clip_tower(cfg, size, load_weights=load_weights)


def _hf_clip(cfg, size, load_weights, arch):
    from reidscale.models.hf_clip import build_hf_clip

    return build_hf_clip(cfg, size, load_weights=load_weights, arch=arch)


def _resnet50(cfg, size, load_weights, arch):
    from reidscale.models.resnet import build_resnet50

    return build_resnet50(cfg, size, load_weights=load_weights)


def _osnet(cfg, size, load_weights, arch):
    from reidscale.models.osnet import build_osnet

    return build_osnet(cfg, size, load_weights=load_weights)


CONSTRUCTORS = {"open_clip": _open_clip, "hf_clip": _hf_clip, "resnet50": _resnet50,
                **{name: _osnet for name in BACKBONES if name.startswith("osnet_")}}


def build_backbone(cfg: ModelConfig, image_size: tuple[int, int], *, load_weights: bool = True,
                   arch: dict | None = None) -> tuple[nn.Module, int]:
    """(module, feature_dim) for images of ``image_size`` = (height, width).

    ``load_weights=False`` builds the architecture only (random init) whatever
    ``cfg.pretrained`` says; ``arch`` is an export's ``backbone_config`` for backbones whose
    architecture is not fully named by the config (hf_clip)."""
    if cfg.backbone not in CONSTRUCTORS:
        raise ConfigError(f"model.backbone: {cfg.backbone!r} is not one of {list(CONSTRUCTORS)}")
    return CONSTRUCTORS[cfg.backbone](cfg, tuple(image_size), load_weights, arch)
