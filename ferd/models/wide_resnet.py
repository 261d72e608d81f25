"""Wide residual networks (Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016).

The layout is the one of the TRADES code (Zhang et al. 2019) and RobustBench, which FERD's robust
teachers use: ``conv1``; ``block1``/``block2``/``block3`` each ``.layer.N.{bn1, relu1, conv1, bn2,
relu2, conv2, convShortcut}`` (pre-activation basic blocks; ``convShortcut`` only where the width
changes); final ``bn1``, ``relu``, ``fc``. Depth 34 gives n = (34 - 4) / 6 = 5 blocks per group;
widths are 16, 16k, 32k, 64k for widen factor k (10 or 20). Dropout is off (dropRate 0). The
TRADES checkpoints also carry an unused ``sub_block1`` that is never called in ``forward``; it is
not built here and ``ferd.models.compat.adapt_state_dict`` drops its keys.

Features Z = final ``bn1`` output *before* its ReLU (the split FERD's code uses for WRN-34-10);
head = ReLU - global average pool - ``fc`` (adaptive pooling, so any input size works).
Initialisation follows the reference code: conv weights N(0, 2/(k*k*out_channels)), BN weight 1 and
bias 0, linear bias 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ferd.models.base import FerdNet


def _conv(in_planes: int, out_planes: int, kernel_size: int, stride: int) -> nn.Conv2d:
    """Bias-free conv with the reference init N(0, 2/(k*k*out)).

    PyTorch's default init is skipped: it would be overwritten anyway and is slow at WRN-34-20 size.
    """
    conv = torch.nn.utils.skip_init(
        nn.Conv2d, in_planes, out_planes, kernel_size=kernel_size, stride=stride, padding=kernel_size // 2, bias=False
    )
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    return conv


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 with an identity or 1x1-conv (``convShortcut``) shortcut."""

    def __init__(self, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU()
        self.conv1 = _conv(in_planes, out_planes, 3, stride)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU()
        self.conv2 = _conv(out_planes, out_planes, 3, 1)
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = (  # noqa: N815 - RobustBench key name
            None if self.equal_in_out else _conv(in_planes, out_planes, 1, stride)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        act = self.relu1(self.bn1(x))
        out = self.conv1(act)
        out = self.conv2(self.relu2(self.bn2(out)))
        # As in the reference: when the width changes, the shortcut sees the pre-activated input.
        skip = x if self.convShortcut is None else self.convShortcut(act)
        return skip + out


class NetworkBlock(nn.Module):
    """``n`` wide basic blocks in ``self.layer``; the first one changes width/stride."""

    def __init__(self, n: int, in_planes: int, out_planes: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(
            *[WideBasicBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1) for i in range(n)]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class WideResNet(FerdNet):
    """WRN-depth-k in the TRADES/RobustBench layout."""

    def __init__(
        self,
        depth: int = 34,
        widen_factor: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ):
        super().__init__(in_channels, mean, std)
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = _conv(in_channels, widths[0], 3, 1)
        self.block1 = NetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = NetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = NetworkBlock(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.relu = nn.ReLU()
        self.fc = nn.Linear(widths[3], num_classes)
        self.n_channels = widths[3]
        nn.init.zeros_(self.fc.bias)  # conv init in _conv; BatchNorm already starts at weight 1, bias 0

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.normalize(x))
        out = self.block3(self.block2(self.block1(out)))
        return self.bn1(out)

    def forward_head(self, z: torch.Tensor) -> torch.Tensor:
        out = F.adaptive_avg_pool2d(self.relu(z), 1)
        return self.fc(torch.flatten(out, 1))


def wrn34_10(num_classes: int = 10, in_channels: int = 3, mean=None, std=None) -> WideResNet:
    """WRN-34-10 (TRADES / RobustBench layout)."""
    return WideResNet(34, 10, num_classes, in_channels, mean, std)


def wrn34_20(num_classes: int = 10, in_channels: int = 3, mean=None, std=None) -> WideResNet:
    """WRN-34-20 (TRADES / RobustBench layout)."""
    return WideResNet(34, 20, num_classes, in_channels, mean, std)
