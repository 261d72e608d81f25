"""The model registry: every classifier of ``ferd.config.ARCHITECTURES``, the FERD generator, and
checkpoint adaptation.

Every classifier is a :class:`~ferd.models.base.FerdNet`: it takes [0, 1] images of any channel
count and any size >= 8 (adaptive global pooling), normalises inside (non-persistent mean/std), and
exposes the FERD split ``forward_features`` (-> Z) / ``forward_head`` (Z -> logits).

==================  =============================================================================
name                layout
==================  =============================================================================
cnn                 small 4-conv CNN of width ``w`` (``ferd.models.cnn``)
resnet8, resnet20   CIFAR ResNets of He et al. 2016 (``ferd.models.resnet``)
resnet18            kuangliu / RobustBench CIFAR ResNet-18 (``ferd.models.resnet``)
preactresnet18/34   kuangliu PreActResNet with final ``bn`` (``ferd.models.preact_resnet``)
mobilenetv2         kuangliu CIFAR MobileNetV2 (``ferd.models.mobilenetv2``)
wrn34_10, wrn34_20  TRADES / RobustBench WideResNet-34 (``ferd.models.wide_resnet``)
==================  =============================================================================
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence

from ferd.errors import ConfigError
from ferd.models.base import FerdNet
from ferd.models.cnn import SmallCNN
from ferd.models.compat import adapt_state_dict
from ferd.models.generator import Generator, build_generator, reset_generator
from ferd.models.mobilenetv2 import MobileNetV2, mobilenetv2
from ferd.models.preact_resnet import PreActResNet, preactresnet18, preactresnet34
from ferd.models.resnet import ResNet, resnet8, resnet18, resnet20
from ferd.models.wide_resnet import WideResNet, wrn34_10, wrn34_20

__all__ = [
    "ARCH_REGISTRY",
    "FerdNet",
    "Generator",
    "MobileNetV2",
    "PreActResNet",
    "ResNet",
    "SmallCNN",
    "WideResNet",
    "adapt_state_dict",
    "build_generator",
    "build_model",
    "list_architectures",
    "reset_generator",
]

#: A builder takes ``(num_classes=, in_channels=, mean=, std=, width=)`` keywords.
Builder = Callable[..., FerdNet]


def _fixed(fn: Callable[..., FerdNet]) -> Builder:
    """Wrap a fixed-width architecture so it accepts (and ignores) ``width``."""

    def build(*, num_classes: int, in_channels: int, mean=None, std=None, width: int = 16) -> FerdNet:
        del width
        return fn(num_classes=num_classes, in_channels=in_channels, mean=mean, std=std)

    build.__name__ = fn.__name__
    build.__doc__ = fn.__doc__
    return build


def _cnn(*, num_classes: int, in_channels: int, mean=None, std=None, width: int = 16) -> FerdNet:
    """Small CNN of width ``width``."""
    return SmallCNN(num_classes=num_classes, in_channels=in_channels, width=width, mean=mean, std=std)


ARCH_REGISTRY: dict[str, Builder] = {
    "cnn": _cnn,
    "resnet8": _fixed(resnet8),
    "resnet20": _fixed(resnet20),
    "resnet18": _fixed(resnet18),
    "preactresnet18": _fixed(preactresnet18),
    "preactresnet34": _fixed(preactresnet34),
    "mobilenetv2": _fixed(mobilenetv2),
    "wrn34_10": _fixed(wrn34_10),
    "wrn34_20": _fixed(wrn34_20),
}

#: Smallest input side every registered architecture handles (the CNN pools twice by 2).
MIN_IMAGE_SIZE = 4


def list_architectures() -> list[str]:
    """Registered architecture names, sorted."""
    return sorted(ARCH_REGISTRY)


def build_model(
    arch: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    width: int = 16,
) -> FerdNet:
    """A fresh (randomly initialised, train-mode) classifier ``arch``; ``width`` is only used by ``cnn``."""
    if arch not in ARCH_REGISTRY:
        close = difflib.get_close_matches(str(arch), list_architectures(), n=1, cutoff=0.4)
        hint = f"; did you mean '{close[0]}'?" if close else ""
        raise ConfigError(f"teacher.arch: unknown architecture {arch!r}{hint} (valid: {', '.join(list_architectures())})")
    if num_classes < 1:
        raise ConfigError(f"num_classes must be >= 1, got {num_classes}")
    if in_channels < 1:
        raise ConfigError(f"in_channels must be >= 1, got {in_channels}")
    if image_size < MIN_IMAGE_SIZE:
        raise ConfigError(f"image_size must be >= {MIN_IMAGE_SIZE} for {arch}, got {image_size}")
    if width < 1:
        raise ConfigError(f"teacher.width must be >= 1, got {width}")
    try:
        return ARCH_REGISTRY[arch](num_classes=num_classes, in_channels=in_channels, mean=mean, std=std, width=width)
    except ValueError as exc:  # bad mean/std length or values
        raise ConfigError(f"{arch}: {exc}; check teacher.mean / teacher.std") from None
