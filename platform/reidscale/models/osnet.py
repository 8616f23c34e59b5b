"""OSNet (Zhou, Yang, Cavallaro, Xiang; ICCV 2019, "Omni-Scale Feature Learning for Person
Re-Identification"), written from the paper.

- Lite 3×3: a 1×1 pointwise conv then a 3×3 depthwise conv (+BN, ReLU) (Fig. 3).
- Omni-scale residual bottleneck (Fig. 4): 1×1 reduces to C/4 channels, T=4 streams of
  1, 2, 3, 4 stacked Lite 3×3 (receptive fields 3, 5, 7, 9), a *unified* aggregation gate
  (one small network GAP → FC → ReLU → FC → sigmoid, shared by all streams) weights each
  stream per channel, the streams are summed, 1×1 expands back, plus the shortcut.
- Network (Table 1): conv1 7×7/2 + 3×3 max-pool/2; conv2, conv3, conv4 of two bottlenecks
  each, with a 1×1 conv + 2×2 average pool/2 transition after conv2 and conv3; conv5 1×1;
  global average pool; fc 512. Channels [64, 256, 384, 512] × the width multiplier.

Parameter names follow the widely used torchreid implementation, so its ImageNet
checkpoints load with ``model.pretrained=osnet_x1_0_imagenet.pth``.
"""

from __future__ import annotations

import torch
from torch import nn

from reidscale.models.norm import bf16_safe_batchnorm
from reidscale.models.weights import load_state, read_state_dict, strip_prefix

WIDTHS = {"osnet_x1_0": 1.0, "osnet_x0_75": 0.75, "osnet_x0_5": 0.5, "osnet_x0_25": 0.25}
BASE_CHANNELS = (64, 256, 384, 512)
FEATURE_DIM = 512


class ConvBNReLU(nn.Module):
    def __init__(self, cin: int, cout: int, kernel: int = 1, stride: int = 1, relu: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True) if relu else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv(x)))


class LiteConv3x3(nn.Module):
    """Pointwise 1×1 (linear) then depthwise 3×3, BN, ReLU: 3×3 receptive field at ~1/9 of the cost."""

    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 1, bias=False)
        self.conv2 = nn.Conv2d(cout, cout, 3, padding=1, groups=cout, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.bn(self.conv2(self.conv1(x))))


class AggregationGate(nn.Module):
    """Channel weights in (0, 1) from the stream's own content (GAP → C/16 → C, sigmoid)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.fc1 = nn.Conv2d(channels, channels // reduction, 1)
        self.fc2 = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        g = torch.sigmoid(self.fc2(torch.relu(self.fc1(x.mean(dim=(2, 3), keepdim=True)))))
        return x * g


class OSBlock(nn.Module):
    """Omni-scale residual bottleneck with T=4 streams and a unified aggregation gate."""

    def __init__(self, cin: int, cout: int, reduction: int = 4):
        super().__init__()
        mid = cout // reduction
        self.conv1 = ConvBNReLU(cin, mid)
        # stream t stacks t Lite 3×3 convs: receptive fields 3, 5, 7, 9
        self.conv2a = LiteConv3x3(mid, mid)
        self.conv2b = nn.Sequential(*[LiteConv3x3(mid, mid) for _ in range(2)])
        self.conv2c = nn.Sequential(*[LiteConv3x3(mid, mid) for _ in range(3)])
        self.conv2d = nn.Sequential(*[LiteConv3x3(mid, mid) for _ in range(4)])
        self.gate = AggregationGate(mid)  # one gate, shared by the four streams ("unified")
        self.conv3 = ConvBNReLU(mid, cout, relu=False)
        self.downsample = ConvBNReLU(cin, cout, relu=False) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1 = self.conv1(x)
        x2 = sum(self.gate(stream(x1)) for stream in (self.conv2a, self.conv2b, self.conv2c, self.conv2d))
        shortcut = self.downsample(x) if self.downsample is not None else x
        return torch.relu(self.conv3(x2) + shortcut)


def _stage(cin: int, cout: int, blocks: int, reduce: bool) -> nn.Sequential:
    layers: list[nn.Module] = [OSBlock(cin, cout)] + [OSBlock(cout, cout) for _ in range(blocks - 1)]
    if reduce:  # transition: 1×1 conv + 2×2 average pool, stride 2
        layers.append(nn.Sequential(ConvBNReLU(cout, cout), nn.AvgPool2d(2, stride=2)))
    return nn.Sequential(*layers)


class OSNet(nn.Module):
    """Images N×3×H×W → N×512 (the fc layer's output)."""

    uses_side_info = False

    def __init__(self, width: float = 1.0, blocks: tuple[int, int, int] = (2, 2, 2), feature_dim: int = FEATURE_DIM):
        super().__init__()
        c = [int(round(ch * width)) for ch in BASE_CHANNELS]
        self.conv1 = ConvBNReLU(3, c[0], kernel=7, stride=2)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        self.conv2 = _stage(c[0], c[1], blocks[0], reduce=True)
        self.conv3 = _stage(c[1], c[2], blocks[1], reduce=True)
        self.conv4 = _stage(c[2], c[3], blocks[2], reduce=False)
        self.conv5 = ConvBNReLU(c[3], c[3])
        self.fc = nn.Sequential(nn.Linear(c[3], feature_dim), nn.BatchNorm1d(feature_dim), nn.ReLU(inplace=True))
        self.dim = feature_dim
        self._init()
        bf16_safe_batchnorm(self)

    def _init(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, images: torch.Tensor, cameras=None, views=None) -> torch.Tensor:
        x = self.maxpool(self.conv1(images))
        x = self.conv5(self.conv4(self.conv3(self.conv2(x))))
        return self.fc(x.mean(dim=(2, 3)))


def build_osnet(cfg, image_size: tuple[int, int], *, load_weights: bool = True) -> tuple[nn.Module, int]:
    model = OSNet(WIDTHS[cfg.backbone])
    if load_weights and cfg.pretrained:
        # a torchreid ImageNet checkpoint (its classifier ignored) or a reidscale export (its backbone.*)
        state = strip_prefix(read_state_dict(cfg.pretrained), "backbone.")
        load_state(model, state, source=cfg.pretrained, may_ignore=("classifier.", "neck."))
    return model, model.dim
