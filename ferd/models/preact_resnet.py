"""Pre-activation residual networks (He et al., "Identity Mappings in Deep Residual Networks", ECCV 2016).

The layout is the kuangliu ``pytorch-cifar`` PreActResNet as used by the adversarial-training
literature (e.g. Rice et al. 2020), i.e. with a final BatchNorm ``bn`` before the classifier:
``conv1``; ``layer1..layer4`` of ``PreActBlock`` (``bn1, conv1, bn2, conv2`` and, when the shape
changes, ``shortcut.0`` = 1x1 conv without BN); ``bn``; ``linear``. Stages have 64/128/256/512
channels; PreActResNet-18 uses [2, 2, 2, 2] blocks, PreActResNet-34 [3, 4, 6, 3].

Features Z = output of the final ``bn`` *before* its ReLU; head = ReLU - global average pool -
``linear`` (adaptive pooling, so any input size works).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ferd.models.base import FerdNet


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 (+ shortcut taken from the first pre-activation)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.has_shortcut = stride != 1 or in_planes != planes
        if self.has_shortcut:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        skip = self.shortcut(out) if self.has_shortcut else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + skip


class PreActResNet(FerdNet):
    """conv1, four stages of pre-activation blocks, final ``bn`` and ``linear``."""

    def __init__(
        self,
        num_blocks: Sequence[int],
        num_classes: int = 10,
        in_channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__(in_channels, mean, std)
        stages = (64, 128, 256, 512)
        if len(num_blocks) != len(stages):
            raise ValueError(f"num_blocks needs {len(stages)} entries, got {len(num_blocks)}")
        self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
        in_planes = 64
        for i, (planes, n) in enumerate(zip(stages, num_blocks, strict=True)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(PreActBlock(in_planes, planes, stride))
                in_planes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.bn(out)

    def forward_head(self, z: torch.Tensor) -> torch.Tensor:
        out = F.adaptive_avg_pool2d(F.relu(z), 1)
        return self.linear(torch.flatten(out, 1))


def preactresnet18(num_classes: int = 10, in_channels: int = 3, mean=None, std=None) -> PreActResNet:
    """PreActResNet-18 ([2, 2, 2, 2] blocks)."""
    return PreActResNet((2, 2, 2, 2), num_classes, in_channels, mean, std)


def preactresnet34(num_classes: int = 10, in_channels: int = 3, mean=None, std=None) -> PreActResNet:
    """PreActResNet-34 ([3, 4, 6, 3] blocks)."""
    return PreActResNet((3, 4, 6, 3), num_classes, in_channels, mean, std)
