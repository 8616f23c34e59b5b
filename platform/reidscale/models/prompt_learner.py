"""CLIP-ReID's text side: a full open_clip CLIP, its frozen text tower, and learnable prompts.

CLIP-ReID (Li, Sun, Li; AAAI 2023) learns, per identity, the tokens X of the sentence
"A photo of a X X X X person." while the image and text encoders stay frozen (stage 1),
then fine-tunes the image encoder against the frozen identity text features (stage 2).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from reidscale.config import ConfigError
from reidscale.models.backbone import ModelConfig
from reidscale.models.weights import load_state, read_state_dict

CLIP_VOCAB_SIZE = 49408
CLIP_CONTEXT_LENGTH = 77


def build_clip(cfg: ModelConfig, image_size: tuple[int, int], *, text_width: int = 64, text_layers: int = 1,
               text_heads: int = 2) -> nn.Module:
    """An open_clip CLIP (image + text towers): a named model, or a tiny random one for tests/CPU.

    Pretrained weights (an open_clip tag or a local file) load as for ``build_backbone``:
    resolved first (fails fast offline), QuickGELU when the tag was trained with it, the image
    position table interpolated to ``image_size``. ``wrap_tower(clip.visual, cfg, image_size)``
    (``open_clip_tower``) gives the ReID image tower (OLP, SIE, feature choice) sharing its weights.
    """
    import open_clip

    from reidscale.models.open_clip_tower import quick_gelu, resolve_pretrained

    path = resolve_pretrained(cfg.open_clip_model, cfg.pretrained) if cfg.pretrained else None
    if cfg.open_clip_model:
        model_cfg = open_clip.get_model_config(cfg.open_clip_model)
        if model_cfg is None:
            raise ConfigError(f"model.open_clip_model: unknown open_clip model {cfg.open_clip_model!r}")
        vit = not isinstance(model_cfg["vision_cfg"]["layers"], (list, tuple))
        clip = open_clip.create_model(cfg.open_clip_model, pretrained=None, load_weights=False,
                                      force_image_size=image_size if vit else None,
                                      force_quick_gelu=quick_gelu(cfg.open_clip_model, cfg.pretrained))
    else:
        h, w = image_size
        clip = open_clip.CLIP(
            embed_dim=cfg.embed_dim,
            vision_cfg={"image_size": (h, w), "patch_size": cfg.patch_size, "width": cfg.width, "layers": cfg.layers,
                        "head_width": cfg.width // cfg.heads, "mlp_ratio": cfg.mlp_ratio},
            text_cfg={"context_length": CLIP_CONTEXT_LENGTH, "vocab_size": CLIP_VOCAB_SIZE, "width": text_width,
                      "heads": text_heads, "layers": text_layers},
        )
    if path is not None:
        load_clip_weights(clip, read_state_dict(path), source=str(path), mode=cfg.pos_interpolation)
    return clip


def load_clip_weights(clip: nn.Module, state: dict[str, torch.Tensor], *, source: str, mode: str = "bicubic") -> None:
    """A full CLIP state dict into ``clip``, the image position table resized to its grid."""
    from reidscale.models.open_clip_tower import interpolate_pos_embed

    state, params = dict(state), dict(clip.named_parameters())
    for key in ("visual.positional_embedding", "visual.attnpool.positional_embedding"):
        if key in state and key in params:
            if key == "visual.positional_embedding":
                grid = tuple(clip.visual.grid_size)
            else:  # a CLIP ResNet's own attention pool is square
                side = math.isqrt(params[key].shape[0] - 1)
                grid = (side, side)
            state[key] = interpolate_pos_embed(state[key], grid, mode=mode)
    # OpenAI's state dicts carry three non-tensor hyper-parameters as 0-d tensors
    load_state(clip, state, source=source, may_ignore=("input_resolution", "context_length", "vocab_size"))


class TextTower(nn.Module):
    """CLIP's text encoder applied to token *embeddings* (so prompts can be learned), frozen."""

    def __init__(self, clip: nn.Module):
        super().__init__()
        self.transformer = clip.transformer
        self.positional_embedding = clip.positional_embedding
        self.ln_final = clip.ln_final
        self.text_projection = clip.text_projection
        self.register_buffer("attn_mask", clip.attn_mask, persistent=False)
        for p in self.parameters():
            p.requires_grad_(False)

    def forward(self, embeddings: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        x = embeddings + self.positional_embedding.to(embeddings.dtype)
        x = self.transformer(x, attn_mask=self.attn_mask)
        x = self.ln_final(x)
        # CLIP pools at the end-of-text token, which has the largest id in the sequence
        x = x[torch.arange(x.shape[0], device=x.device), tokens.argmax(dim=-1)]
        proj = self.text_projection
        return proj(x) if isinstance(proj, nn.Linear) else x @ proj


class PromptLearner(nn.Module):
    """Per-identity learnable tokens in "A photo of a X X X X <noun>." (CLIP-ReID)."""

    def __init__(self, num_classes: int, token_embedding: nn.Embedding, *, n_ctx: int = 4, noun: str = "person"):
        super().__init__()
        import open_clip

        template = "A photo of a " + " ".join(["X"] * n_ctx) + f" {noun}."
        tokens = open_clip.tokenize([template], context_length=CLIP_CONTEXT_LENGTH)
        x_id = open_clip.tokenize(["X"])[0, 1]
        where = (tokens[0] == x_id).nonzero().flatten()
        if len(where) != n_ctx or int(where[-1] - where[0]) != n_ctx - 1:
            raise ValueError(f"template {template!r} does not tokenize into {n_ctx} consecutive X tokens")
        start = int(where[0])
        with torch.no_grad():
            embedded = token_embedding(tokens)
        dim = embedded.shape[-1]
        self.register_buffer("tokens", tokens, persistent=False)
        self.register_buffer("prefix", embedded[:, :start].clone(), persistent=False)
        self.register_buffer("suffix", embedded[:, start + n_ctx :].clone(), persistent=False)
        # CLIP-ReID initialises the identity tokens from N(0, 0.02²)
        self.ctx = nn.Parameter(torch.randn(num_classes, n_ctx, dim) * 0.02)

    def forward(self, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(token embeddings B×77×D, token ids B×77) for identity ``labels``."""
        n = labels.shape[0]
        ctx = self.ctx[labels]
        emb = torch.cat([self.prefix.expand(n, -1, -1).to(ctx.dtype), ctx, self.suffix.expand(n, -1, -1).to(ctx.dtype)], 1)
        return emb, self.tokens.expand(n, -1)


class Stage1Model(nn.Module):
    """Identity labels → text features; only the prompt tokens train."""

    def __init__(self, prompts: PromptLearner, text: TextTower):
        super().__init__()
        self.prompts = prompts
        self.text = text

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.text(*self.prompts(labels))


@torch.no_grad()
def all_text_features(stage1: Stage1Model, num_classes: int, *, chunk: int = 256, rank: int = 0,
                      world: int = 1) -> torch.Tensor:
    """Text features of every identity (classes × D, float32), each rank computing a stride."""
    import torch.distributed as dist

    device = stage1.prompts.ctx.device
    labels = torch.arange(rank, num_classes, world, device=device)
    parts = [stage1(labels[i : i + chunk]).float() for i in range(0, len(labels), chunk)]
    mine = torch.cat(parts) if parts else torch.zeros(0, device=device)
    if world == 1:
        return mine.cpu()
    gathered = [None] * world
    dist.all_gather_object(gathered, (rank, mine.cpu()))
    out = torch.zeros(num_classes, mine.shape[1])
    for r, feats in gathered:
        out[r::world] = feats
    return out


def i2t_logits(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """Stage 2's image→all-identity-texts scores (CLIP-ReID: plain dot products of the projections)."""
    return image_features.float() @ text_features.t().to(image_features.device, torch.float32)


__all__ = ["PromptLearner", "Stage1Model", "TextTower", "all_text_features", "build_clip", "i2t_logits"]
