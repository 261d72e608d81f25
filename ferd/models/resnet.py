"""Post-activation residual networks (He et al., "Deep Residual Learning", CVPR 2016).

* ``resnet8`` / ``resnet20``: the CIFAR ResNets of the paper's §4.2 (6n+2 layers, three stages of
  16/32/64 channels, n = 1 or 3 basic blocks per stage), with projection (option B: 1x1 conv + BN)
  shortcuts where the shape changes.
* ``resnet18``: the ImageNet ResNet-18 block structure adapted to 32x32 inputs exactly as in the
  kuangliu ``pytorch-cifar`` repository (3x3 stride-1 stem, no max-pool, stages of 64/128/256/512
  channels, two basic blocks each). This is also RobustBench's CIFAR ResNet-18 layout, so its
  state-dict keys are ``conv1, bn1, layer1..layer4.{0,1}.{conv1,bn1,conv2,bn2,shortcut.0,shortcut.1},
  linear``.

Features Z = output of the last stage (after its ReLU); head = global average pool + ``linear``.
The global pool is adaptive, so any input size works.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ferd.models.base import FerdNet


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN (+ shortcut) - ReLU; ``shortcut`` is empty or (1x1 conv, BN)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(FerdNet):
    """Stem conv3x3-BN-ReLU, then ``len(stages)`` stages of basic blocks (``layer1``...), then ``linear``.

    The first stage keeps the resolution, every later one halves it (stride 2 in its first block).
    """

    def __init__(
        self,
        stages: Sequence[int],
        num_blocks: Sequence[int],
        num_classes: int = 10,
        in_channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__(in_channels, mean, std)
        if len(stages) != len(num_blocks) or not stages:
            raise ValueError("stages and num_blocks need the same, non-zero length")
        self.conv1 = nn.Conv2d(in_channels, stages[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(stages[0])
        in_planes = stages[0]
        self.num_stages = len(stages)
        for i, (planes, n) in enumerate(zip(stages, num_blocks, strict=True)):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(BasicBlock(in_planes, planes, stride))
                in_planes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(in_planes, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(self.normalize(x))))
        for i in range(self.num_stages):
            out = getattr(self, f"layer{i + 1}")(out)
        return out

    def forward_head(self, z: torch.Tensor) -> torch.Tensor:
        return self.linear(torch.flatten(F.adaptive_avg_pool2d(z, 1), 1))


def resnet8(num_classes: int = 10, in_channels: int = 3, mean=None, std=None) -> ResNet:
    """CIFAR ResNet-8 (He et al. 2016, n = 1)."""
    return ResNet((16, 32, 64), (1, 1, 1), num_classes, in_channels, mean, std)


def resnet20(num_classes: int = 10, in_channels: int = 3, mean=None, std=None) -> ResNet:
    """CIFAR ResNet-20 (He et al. 2016, n = 3)."""
    return ResNet((16, 32, 64), (3, 3, 3), num_classes, in_channels, mean, std)


def resnet18(num_classes: int = 10, in_channels: int = 3, mean=None, std=None) -> ResNet:
    """ResNet-18 in the kuangliu pytorch-cifar / RobustBench layout."""
    return ResNet((64, 128, 256, 512), (2, 2, 2, 2), num_classes, in_channels, mean, std)
