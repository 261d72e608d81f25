"""MobileNetV2 (Sandler et al., "MobileNetV2: Inverted Residuals and Linear Bottlenecks", CVPR 2018).

CIFAR variant in the kuangliu ``pytorch-cifar`` layout: the stem ``conv1`` has stride 1 and so has
the second configuration stage (24 channels), so a 32x32 input ends on a 4x4 map. Keys: ``conv1,
bn1``; ``layers.N.{conv1, bn1, conv2, bn2, conv3, bn3}`` (expand 1x1, depthwise 3x3, project 1x1)
plus ``layers.N.shortcut.{0,1}`` (1x1 conv + BN) for stride-1 blocks whose width changes; ``conv2,
bn2`` (1x1 to 1280 channels); ``linear``.

Features Z = ``bn2`` output before its ReLU; head = ReLU - global average pool - ``linear``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ferd.models.base import FerdNet

#: (expansion, out_planes, num_blocks, stride) per stage; stride 1 (not 2) in stage 2 for CIFAR.
CFG: tuple[tuple[int, int, int, int], ...] = (
    (1, 16, 1, 1),
    (6, 24, 2, 1),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


class InvertedResidual(nn.Module):
    """expand (1x1) - depthwise (3x3) - linear project (1x1); residual only for stride 1."""

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int):
        super().__init__()
        self.stride = stride
        planes = expansion * in_planes
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, groups=planes, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)
        self.shortcut = nn.Sequential()
        if stride == 1 and in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=1, padding=0, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return out + self.shortcut(x) if self.stride == 1 else out


class MobileNetV2(FerdNet):
    """MobileNetV2 for small images (kuangliu CIFAR variant)."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__(in_channels, mean, std)
        self.conv1 = nn.Conv2d(in_channels, 32, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        blocks = []
        in_planes = 32
        for expansion, out_planes, n, stride in CFG:
            for j in range(n):
                blocks.append(InvertedResidual(in_planes, out_planes, expansion, stride if j == 0 else 1))
                in_planes = out_planes
        self.layers = nn.Sequential(*blocks)
        self.conv2 = nn.Conv2d(in_planes, 1280, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(1280)
        self.linear = nn.Linear(1280, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        out = self.layers(out)
        return self.bn2(self.conv2(out))

    def forward_head(self, z: torch.Tensor) -> torch.Tensor:
        out = F.adaptive_avg_pool2d(F.relu(z), 1)
        return self.linear(torch.flatten(out, 1))


def mobilenetv2(num_classes: int = 10, in_channels: int = 3, mean=None, std=None) -> MobileNetV2:
    """MobileNetV2, kuangliu CIFAR variant."""
    return MobileNetV2(num_classes, in_channels, mean, std)
