"""open_clip image towers for ReID: any open_clip ViT or ModifiedResNet, by name or tiny.

What the ReID papers add to a plain CLIP image tower, each one a config value:

- any input size (256×128, 256×256): the position table is interpolated from the checkpoint's
  grid when pretrained weights are loaded (``model.pos_interpolation``; the CLIP-ReID and
  TransReID code use bilinear, timm/HF/open_clip bicubic);
- overlapping patches, TransReID's "OLP" (``model.stride`` < patch size, e.g. 12 for 16-px
  patches): the patch conv strides by S, the grid becomes ((H-P)//S+1)×((W-P)//S+1);
- side-information embedding, "SIE" (``model.sie_cameras``/``sie_views``): a learnable vector
  per camera (×view), times λ, added to every token (TransReID, λ=3) or to the class token only
  (CLIP-ReID, λ=1). The forward takes ``cameras=``/``views=`` (N integer ids); without them no
  side information is added;
- the output (``model.feature``): the projected class token ``proj`` (CLIP's image feature), the
  class token before projection ``cls``, or both concatenated ``cls+proj`` (CLIP-ReID's test
  feature). For a ResNet ``cls`` is the average-pooled last feature map and ``proj`` the
  attention-pool output.

Parameter names are open_clip's (``conv1.weight``, ``positional_embedding``, ...), so open_clip
checkpoints (a full CLIP's ``visual.*`` or an image tower alone) load directly, and exports
written before these options existed load unchanged.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from reidscale.config import ConfigError
from reidscale.models.norm import bf16_safe_batchnorm
from reidscale.models.weights import load_state, read_state_dict, strip_prefix


def interpolate_pos_embed(pos: torch.Tensor, new_grid: tuple[int, int], *, mode: str = "bicubic",
                          old_grid: tuple[int, int] | None = None) -> torch.Tensor:
    """A (1 + h·w)×D position table (class row first) resized to ``new_grid`` = (h, w).

    The class row is kept; the grid rows are resized as an image (``align_corners=False``,
    no antialiasing, as in TransReID/CLIP-ReID). Without ``old_grid`` a table that already
    has h·w grid rows is returned as it is, and any other is taken to be a square grid.
    """
    cls, grid = pos[:1], pos[1:]
    if old_grid is None and len(grid) == new_grid[0] * new_grid[1]:
        return pos  # already this grid (e.g. a checkpoint trained at this input size)
    if old_grid is None:
        side = math.isqrt(len(grid))
        if side * side != len(grid):
            raise ConfigError(f"model.pretrained: a position table of {len(grid)} grid rows is not a square grid")
        old_grid = (side, side)
    if tuple(old_grid) == tuple(new_grid):
        return pos
    dim = grid.shape[-1]
    grid = grid.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid = F.interpolate(grid, size=new_grid, mode=mode, align_corners=False)
    grid = grid.permute(0, 2, 3, 1).reshape(new_grid[0] * new_grid[1], dim)
    return torch.cat([cls.float(), grid]).to(pos.dtype)


def _adopt(module: nn.Module, tower: nn.Module) -> None:
    """Register ``tower``'s children and own parameters on ``module`` under the same names
    (shared, not copied), so state-dict keys stay open_clip's."""
    for name, child in tower.named_children():
        module.add_module(name, child)
    for name, param in tower.named_parameters(recurse=False):
        module.register_parameter(name, param)


class OpenClipViT(nn.Module):
    """An open_clip VisionTransformer with OLP, SIE and a choice of output feature."""

    def __init__(self, visual: nn.Module, image_size: tuple[int, int], *, stride: int = 0, sie_cameras: int = 0,
                 sie_views: int = 0, sie_lambda: float = 3.0, sie_tokens: str = "all", feature: str = "proj",
                 pos_interpolation: str = "bicubic"):
        super().__init__()
        if getattr(visual, "attn_pool", None) is not None or visual.pool_type not in ("tok", "avg"):
            raise ConfigError("model.open_clip_model: towers with attentional pooling are not supported")
        _adopt(self, visual)
        self.pool_type = visual.pool_type
        self.final_ln_after_pool = visual.final_ln_after_pool
        self.width = self.conv1.out_channels
        self.output_dim = int(visual.output_dim)
        self.feature = feature
        self.pos_interpolation = pos_interpolation
        patch = self.conv1.kernel_size[0]
        h, w = image_size
        if stride:
            if stride > patch:
                raise ConfigError(f"model.stride: {stride} is larger than the patch size {patch} "
                                  "(pixels would be skipped)")
            self.conv1.stride = (stride, stride)
            self.grid = ((h - patch) // stride + 1, (w - patch) // stride + 1)
        else:
            if h % patch or w % patch:
                raise ConfigError(f"model.patch_size: {patch} does not divide the image size {h}x{w}")
            self.grid = (h // patch, w // patch)
        if self.positional_embedding.shape[0] != 1 + self.grid[0] * self.grid[1]:
            self.positional_embedding = nn.Parameter(interpolate_pos_embed(
                self.positional_embedding.detach(), self.grid, mode=pos_interpolation,
                old_grid=tuple(visual.grid_size)))
        self.sie_cameras, self.sie_views = sie_cameras, sie_views
        self.sie_lambda, self.sie_tokens = sie_lambda, sie_tokens
        n_side = max(sie_cameras, 1) * max(sie_views, 1) if (sie_cameras or sie_views) else 0
        # TransReID/CLIP-ReID initialise the table from a truncated N(0, 0.02²)
        self.sie_embed = (nn.Parameter(nn.init.trunc_normal_(torch.zeros(n_side, self.width), std=0.02))
                          if n_side else None)

    @property
    def dim(self) -> int:
        return {"proj": self.output_dim, "cls": self.width, "cls+proj": self.width + self.output_dim}[self.feature]

    @property
    def uses_side_info(self) -> bool:
        return self.sie_embed is not None

    def side_embedding(self, cameras: torch.Tensor | None, views: torch.Tensor | None) -> torch.Tensor | None:
        """λ × the learned vector of each sample's camera (×view), N×width; None without SIE or ids."""
        if self.sie_embed is None or (cameras is None and views is None):
            return None
        if self.sie_cameras and self.sie_views:
            if cameras is None or views is None:
                raise ValueError("this model's SIE is per camera×view: pass both cameras= and views=")
            index = cameras.long() * self.sie_views + views.long()
        else:
            index = (cameras if self.sie_cameras else views)
            if index is None:
                raise ValueError(f"this model's SIE is per {'camera' if self.sie_cameras else 'view'}: "
                                 f"pass {'cameras' if self.sie_cameras else 'views'}=")
        return self.sie_lambda * self.sie_embed[index.long()]

    def features(self, images: torch.Tensor, cameras: torch.Tensor | None = None,
                 views: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(class token before projection N×width, its projection N×output_dim)."""
        x = self.conv1(images).flatten(2).transpose(1, 2)
        cls = self.class_embedding.to(x.dtype).expand(x.shape[0], 1, -1)
        x = torch.cat([cls, x], dim=1) + self.positional_embedding.to(x.dtype)
        side = self.side_embedding(cameras, views)
        if side is not None:
            side = side.to(x.dtype)[:, None]
            x = x + side if self.sie_tokens == "all" else torch.cat([x[:, :1] + side, x[:, 1:]], dim=1)
        x = self.ln_pre(self.patch_dropout(x))
        x = self.transformer(x)
        if self.final_ln_after_pool:
            pooled = self.ln_post(x[:, 1:].mean(1) if self.pool_type == "avg" else x[:, 0])
        else:
            x = self.ln_post(x)
            pooled = x[:, 1:].mean(1) if self.pool_type == "avg" else x[:, 0]
        return pooled, pooled @ self.proj

    def forward(self, images: torch.Tensor, cameras: torch.Tensor | None = None,
                views: torch.Tensor | None = None) -> torch.Tensor:
        cls, proj = self.features(images, cameras, views)
        return {"proj": proj, "cls": cls, "cls+proj": torch.cat([cls, proj], dim=1)}[self.feature]

    def load_pretrained(self, state: dict[str, torch.Tensor], source: str) -> None:
        """open_clip weights (full CLIP, image tower, or a reidscale export) into this tower."""
        state = dict(strip_prefix(strip_prefix(state, "backbone."), "visual."))
        if "positional_embedding" in state:
            state["positional_embedding"] = interpolate_pos_embed(state["positional_embedding"], self.grid,
                                                                  mode=self.pos_interpolation)
        load_state(self, state, source=source, may_miss=("sie_embed",))


class OpenClipResNet(nn.Module):
    """An open_clip ModifiedResNet (CLIP's RN50 & co.) at any input size divisible by 32."""

    def __init__(self, visual: nn.Module, image_size: tuple[int, int], *, feature: str = "proj",
                 pos_interpolation: str = "bicubic"):
        super().__init__()
        h, w = image_size
        if h % 32 or w % 32:
            raise ConfigError(f"transform.height/width: open_clip ResNets need sizes divisible by 32, got {h}x{w}")
        _adopt(self, visual)
        bf16_safe_batchnorm(self)
        self.feature = feature
        self.pos_interpolation = pos_interpolation
        self.output_dim = int(visual.output_dim)
        self.width = self.attnpool.k_proj.in_features
        self.grid = (h // 32, w // 32)
        pos = self.attnpool.positional_embedding
        if pos.shape[0] != 1 + self.grid[0] * self.grid[1]:
            self.attnpool.positional_embedding = nn.Parameter(
                interpolate_pos_embed(pos.detach(), self.grid, mode=pos_interpolation))

    @property
    def dim(self) -> int:
        return {"proj": self.output_dim, "cls": self.width, "cls+proj": self.width + self.output_dim}[self.feature]

    uses_side_info = False

    def features(self, images: torch.Tensor, cameras=None, views=None) -> tuple[torch.Tensor, torch.Tensor]:
        """(average-pooled last feature map N×width, attention-pool output N×output_dim)."""
        x = self.act1(self.bn1(self.conv1(images)))
        x = self.act2(self.bn2(self.conv2(x)))
        x = self.avgpool(self.act3(self.bn3(self.conv3(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3)), self.attnpool(x)

    def forward(self, images: torch.Tensor, cameras=None, views=None) -> torch.Tensor:
        cls, proj = self.features(images)
        return {"proj": proj, "cls": cls, "cls+proj": torch.cat([cls, proj], dim=1)}[self.feature]

    def load_pretrained(self, state: dict[str, torch.Tensor], source: str) -> None:
        state = dict(strip_prefix(strip_prefix(state, "backbone."), "visual."))
        key = "attnpool.positional_embedding"
        if key in state:
            state[key] = interpolate_pos_embed(state[key], self.grid, mode=self.pos_interpolation)
        load_state(self, state, source=source)


def quick_gelu(name: str, pretrained: str) -> bool:
    """Whether the tower uses QuickGELU: the model config says so, or the pretrained tag was
    trained with it (OpenAI's weights; open_clip only warns about the mismatch)."""
    import open_clip

    model_cfg = open_clip.get_model_config(name) or {}
    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained) if pretrained else {}
    return bool(model_cfg.get("quick_gelu", False) or tag_cfg.get("quick_gelu", False))


def resolve_pretrained(name: str, pretrained: str) -> Path:
    """A local checkpoint file for ``pretrained``: the path itself, or the file of an open_clip
    tag (from the local cache when HF_HUB_OFFLINE=1, else downloaded). Fails fast, naming the key."""
    if Path(pretrained).is_file():
        return Path(pretrained)
    if not name:
        raise ConfigError(f"model.pretrained: {pretrained!r} is not a file "
                          "(a pretrained tag needs model.open_clip_model)")
    import open_clip

    tag_cfg = open_clip.get_pretrained_cfg(name, pretrained)
    if not tag_cfg:
        known = sorted(tag for model, tag in open_clip.list_pretrained() if model == name)
        raise ConfigError(f"model.pretrained: {pretrained!r} is neither a file nor a pretrained tag of {name} "
                          f"(tags: {known})")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        cached = _cached_tag_file(tag_cfg)
        if cached is None:
            raise ConfigError(f"model.pretrained: {name}/{pretrained} must be downloaded but HF_HUB_OFFLINE=1 and "
                              "it is not in the local cache; pass a local checkpoint file instead")
        return cached
    try:
        return Path(open_clip.download_pretrained(tag_cfg))
    except Exception as exc:  # network or hub errors: one clear message
        raise ConfigError(f"model.pretrained: downloading {name}/{pretrained} failed ({exc}); "
                          "pass a local checkpoint file instead") from None


def _cached_tag_file(tag_cfg: dict) -> Path | None:
    """The tag's file in the Hugging Face cache, looked up without touching the network."""
    hub = tag_cfg.get("hf_hub", "")
    if not hub:
        return None
    from huggingface_hub import try_to_load_from_cache

    model_id, filename = os.path.split(hub)
    for candidate in [filename] if filename else ["open_clip_model.safetensors", "open_clip_pytorch_model.bin"]:
        found = try_to_load_from_cache(model_id, candidate)
        if isinstance(found, str):
            return Path(found)
    return None


def vision_tower(cfg, image_size: tuple[int, int]) -> nn.Module:
    """The bare open_clip tower (random init): ``cfg.open_clip_model`` by name, else the tiny ViT."""
    from open_clip.model import _build_vision_tower
    from open_clip.transformer import VisionTransformer

    if not cfg.open_clip_model:
        return VisionTransformer(image_size=image_size, patch_size=cfg.patch_size, width=cfg.width, layers=cfg.layers,
                                 heads=cfg.heads, mlp_ratio=cfg.mlp_ratio, output_dim=cfg.embed_dim)
    import open_clip

    model_cfg = open_clip.get_model_config(cfg.open_clip_model)
    if model_cfg is None:
        raise ConfigError(f"model.open_clip_model: unknown open_clip model {cfg.open_clip_model!r}")
    vision_cfg = dict(model_cfg["vision_cfg"])
    if vision_cfg.get("timm_model_name"):
        raise ConfigError(f"model.open_clip_model: {cfg.open_clip_model} has a timm image tower; "
                          "only open_clip ViTs and ResNets are supported")
    if not isinstance(vision_cfg["layers"], (list, tuple)):
        vision_cfg["image_size"] = image_size  # ResNets keep their square size; OpenClipResNet resizes
    return _build_vision_tower(model_cfg["embed_dim"], vision_cfg,
                               quick_gelu=quick_gelu(cfg.open_clip_model, cfg.pretrained))


def build_open_clip_tower(cfg, image_size: tuple[int, int], *, load_weights: bool = True) -> tuple[nn.Module, int]:
    """(tower, feature dim) for ``cfg`` (a ModelConfig), pretrained weights loaded if asked for."""
    # resolve first: a missing download fails before a large tower is built
    path = resolve_pretrained(cfg.open_clip_model, cfg.pretrained) if load_weights and cfg.pretrained else None
    tower = wrap_tower(vision_tower(cfg, image_size), cfg, image_size)
    if path is not None:
        tower.load_pretrained(read_state_dict(path), source=str(path))
    return tower, tower.dim


def wrap_tower(visual: nn.Module, cfg, image_size: tuple[int, int]) -> nn.Module:
    """``visual`` (an open_clip image tower, e.g. ``clip.visual``) with ``cfg``'s ReID options;
    parameters are shared with ``visual``, not copied."""
    from open_clip.modified_resnet import ModifiedResNet
    from open_clip.transformer import VisionTransformer

    if isinstance(visual, VisionTransformer):
        return OpenClipViT(visual, image_size, stride=cfg.stride, sie_cameras=cfg.sie_cameras, sie_views=cfg.sie_views,
                           sie_lambda=cfg.sie_lambda, sie_tokens=cfg.sie_tokens, feature=cfg.feature,
                           pos_interpolation=cfg.pos_interpolation)
    if isinstance(visual, ModifiedResNet):
        if cfg.stride or cfg.sie_cameras or cfg.sie_views:
            raise ConfigError("model.stride/sie_cameras/sie_views: overlapping patches and SIE need a ViT tower")
        return OpenClipResNet(visual, image_size, feature=cfg.feature, pos_interpolation=cfg.pos_interpolation)
    raise ConfigError(f"model.open_clip_model: unsupported image tower {type(visual).__name__}")
