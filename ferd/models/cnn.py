"""A small VGG-style CNN for 28x28 grey-scale images (the Fashion-MNIST teacher/student).

Layout (state-dict keys ``conv1, bn1, conv2, bn2, conv3, bn3, conv4, bn4, fc``)::

    conv3x3(c -> w)   - BN - ReLU
    conv3x3(w -> w)   - BN - ReLU - maxpool2
    conv3x3(w -> 2w)  - BN - ReLU
    conv3x3(2w -> 2w) - BN                      -> Z (forward_features, pre-ReLU)
    head: ReLU - maxpool2 - AdaptiveAvgPool2d(3) - flatten - Linear(2w*9 -> num_classes)

The adaptive pool makes the head independent of the input size (8 px fixtures, 28 px Fashion-MNIST,
32 px CIFAR all give a 3x3 map). Convolutions before a BatchNorm carry no bias.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ferd.models.base import FerdNet


def _conv3x3(cin: int, cout: int) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, kernel_size=3, stride=1, padding=1, bias=False)


class SmallCNN(FerdNet):
    """Four 3x3 conv/BN layers of width ``w`` and ``2w`` and one linear layer."""

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        width: int = 16,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__(in_channels, mean, std)
        if width < 1:
            raise ValueError(f"width must be >= 1, got {width}")
        w = width
        self.width = w
        self.conv1 = _conv3x3(in_channels, w)
        self.bn1 = nn.BatchNorm2d(w)
        self.conv2 = _conv3x3(w, w)
        self.bn2 = nn.BatchNorm2d(w)
        self.conv3 = _conv3x3(w, 2 * w)
        self.bn3 = nn.BatchNorm2d(2 * w)
        self.conv4 = _conv3x3(2 * w, 2 * w)
        self.bn4 = nn.BatchNorm2d(2 * w)
        self.pool = nn.AdaptiveAvgPool2d(3)
        self.fc = nn.Linear(2 * w * 9, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.normalize(x)
        out = F.relu(self.bn1(self.conv1(out)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = F.max_pool2d(out, 2)
        out = F.relu(self.bn3(self.conv3(out)))
        return self.bn4(self.conv4(out))

    def forward_head(self, z: torch.Tensor) -> torch.Tensor:
        out = F.max_pool2d(F.relu(z), 2)
        out = torch.flatten(self.pool(out), 1)
        return self.fc(out)
