"""Common base of every classifier in the registry.

Normalisation lives *inside* the model (non-persistent ``mean``/``std`` buffers), so every attack
and every loss works on inputs in [0, 1] and the state-dict keys stay exactly those of the
reference layouts (kuangliu, RobustBench): mean/std travel in the artifact's metadata instead.

FERD (§2.3) splits the teacher into ``f_l`` (input -> intermediate features Z) and ``f_{l+}``
(Z -> logits). Every classifier exposes that split as ``forward_features`` / ``forward_head``; the
split point is the one the paper's code uses for WRN-34-10 (``pop=3``): the last feature map before
global pooling (for WRN/pre-act nets: the final BatchNorm output before its ReLU).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class FerdNet(nn.Module):
    """A classifier over [0,1] images: ``forward(x) = forward_head(forward_features(x))``."""

    def __init__(self, in_channels: int, mean: Sequence[float] | None, std: Sequence[float] | None):
        super().__init__()
        mean_t = torch.zeros(in_channels) if mean is None else torch.as_tensor(list(mean), dtype=torch.float32)
        std_t = torch.ones(in_channels) if std is None else torch.as_tensor(list(std), dtype=torch.float32)
        if mean_t.numel() == 1:
            mean_t = mean_t.expand(in_channels).clone()
        if std_t.numel() == 1:
            std_t = std_t.expand(in_channels).clone()
        if mean_t.numel() != in_channels or std_t.numel() != in_channels:
            raise ValueError(f"mean/std need 1 or {in_channels} values, got {mean_t.numel()}/{std_t.numel()}")
        if bool((std_t <= 0).any()):
            raise ValueError("std values must be positive")
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std_t.view(1, -1, 1, 1), persistent=False)

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """[0,1] images -> intermediate feature map Z (f_l in the paper); normalises first."""
        raise NotImplementedError

    def forward_head(self, z: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        """Feature map Z -> logits (f_{l+} in the paper)."""
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
