"""ResNet-50 for the BoT "strong baseline" (Luo et al., 2019): last stride 1, global average pooling.

With last stride 1 the final feature map of a 256×128 crop is 16×8 instead of 8×4, which
the paper credits with +~1% Rank-1 at no parameter cost. The BNNeck and the classifier are
the ReID head's (``reid.py``). Parameter names are torchvision's, so an ImageNet checkpoint
of ``torchvision.models.resnet50`` loads directly (its ``fc.*`` is ignored).
"""

from __future__ import annotations

import torch
from torch import nn

from reidscale.models.norm import bf16_safe_batchnorm
from reidscale.models.weights import load_state, read_state_dict, strip_prefix


class ResNet50(nn.Module):
    """Images N×3×H×W → N×2048 (average-pooled last feature map)."""

    dim = 2048
    uses_side_info = False

    def __init__(self, last_stride: int = 1):
        super().__init__()
        from torchvision.models import resnet50

        net = resnet50(weights=None)
        # the stride of layer4 lives in its first block's 3×3 conv and its shortcut
        net.layer4[0].conv2.stride = (last_stride, last_stride)
        net.layer4[0].downsample[0].stride = (last_stride, last_stride)
        for name in ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"):
            self.add_module(name, getattr(net, name))
        bf16_safe_batchnorm(self)

    def forward(self, images: torch.Tensor, cameras=None, views=None) -> torch.Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(images))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return x.mean(dim=(2, 3))


def build_resnet50(cfg, image_size: tuple[int, int], *, load_weights: bool = True) -> tuple[nn.Module, int]:
    model = ResNet50(last_stride=cfg.last_stride)
    if load_weights and cfg.pretrained:
        # a torchvision ImageNet checkpoint (its fc ignored) or a reidscale export (its backbone.*)
        state = strip_prefix(read_state_dict(cfg.pretrained), "backbone.")
        load_state(model, state, source=cfg.pretrained, may_ignore=("fc.", "neck."))
    return model, ResNet50.dim
