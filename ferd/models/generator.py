"""The pseudo-sample generator of FERD (ferd-method §2.1), the DFHL/DFAD-style DCGAN decoder.

``Generator(nz, ngf, image_size, channels)`` maps noise z ~ N(0, I) of size ``nz`` to images in
[0, 1]::

    Linear(nz -> 2*ngf*s*s), s = ceil(S/4)  -> reshape [2ngf, s, s]
    BN(2ngf) - Upsample x2 - conv3x3(2ngf -> 2ngf, no bias) - BN - LeakyReLU(0.2)
             - Upsample x2 - conv3x3(2ngf -> ngf, no bias)  - BN - LeakyReLU(0.2)
             - conv3x3(ngf -> channels) - Sigmoid

With ``num_classes > 0`` the generator is class-conditional (beyond the paper, as in conditional
data-free KD, e.g. Yu et al. 2021 "Conditional generative data-free knowledge distillation"): a
learned embedding e(y) of size ``nz`` is concatenated to z, so the first layer is
``Linear(2*nz -> ...)`` and ``forward(z, y)`` needs the labels. Carried across synthesis epochs
(``fae.generator: carried``), it keeps one learned mapping per class instead of re-finding every
class from z alone each epoch.

For sizes S not divisible by 4 the decoder produces 4*ceil(S/4) pixels and the centre S x S crop is
returned, so the output is always ``[B, channels, S, S]``.

``reset_generator(gen, generator)`` re-draws every weight from a ``torch.Generator`` (DCGAN init:
conv/linear weights N(0, 0.02), BN weights N(1, 0.02), biases 0, class embeddings N(0, 1) like z)
so a run is reproducible from its seed regardless of the global RNG state or the device the
generator lives on.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class Generator(nn.Module):
    """Noise ``[B, nz]`` (and labels ``[B]`` when class-conditional) -> images ``[B, channels, S, S]`` in [0, 1]."""

    def __init__(self, nz: int = 100, ngf: int = 64, image_size: int = 32, channels: int = 3, num_classes: int = 0):
        super().__init__()
        if nz < 1 or ngf < 1 or channels < 1:
            raise ValueError(f"nz, ngf and channels must be >= 1, got {nz}, {ngf}, {channels}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0 (0 = unconditional), got {num_classes}")
        if image_size < 4:
            raise ValueError(f"image_size must be >= 4, got {image_size}")
        self.nz = nz
        self.ngf = ngf
        self.image_size = image_size
        self.channels = channels
        self.num_classes = num_classes
        self.init_size = math.ceil(image_size / 4)
        self.embed = nn.Embedding(num_classes, nz) if num_classes > 0 else None
        self.l1 = nn.Linear(2 * nz if num_classes > 0 else nz, 2 * ngf * self.init_size**2)
        self.conv_blocks = nn.Sequential(
            nn.BatchNorm2d(2 * ngf),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, 2 * ngf, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(2 * ngf),
            nn.LeakyReLU(0.2),
            nn.Upsample(scale_factor=2),
            nn.Conv2d(2 * ngf, ngf, kernel_size=3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.LeakyReLU(0.2),
            nn.Conv2d(ngf, channels, kernel_size=3, stride=1, padding=1),
            nn.Sigmoid(),
        )

    def forward(self, z: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        z = z.reshape(z.shape[0], -1)
        if self.embed is not None:
            if y is None or y.shape != (z.shape[0],):
                got = None if y is None else tuple(y.shape)
                raise ValueError(f"a class-conditional generator needs labels [{z.shape[0]}], got {got}")
            z = torch.cat([z, self.embed(y)], dim=1)
        out = self.l1(z)
        out = out.view(z.shape[0], 2 * self.ngf, self.init_size, self.init_size)
        img = self.conv_blocks(out)
        size = img.shape[-1]
        if size != self.image_size:
            top = (size - self.image_size) // 2
            img = img[:, :, top : top + self.image_size, top : top + self.image_size]
        return img


def _draw_(t: torch.Tensor, mean: float, std: float, generator: torch.Generator) -> None:
    """Fill ``t`` with N(mean, std^2) drawn on the generator's device, then copy (device-agnostic)."""
    sample = torch.empty(t.shape, dtype=torch.float32, device=generator.device)
    sample.normal_(mean, std, generator=generator)
    t.copy_(sample)


@torch.no_grad()
def reset_generator(gen: nn.Module, generator: torch.Generator) -> nn.Module:
    """DCGAN initialisation of every conv/linear/BN layer of ``gen``, deterministic given ``generator``.

    Conv/linear weights ~ N(0, 0.02), BN weights ~ N(1, 0.02), all biases 0, BN running statistics
    reset. Returns ``gen``.
    """
    for m in gen.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d | nn.Linear):
            _draw_(m.weight, 0.0, 0.02, generator)
            if m.bias is not None:
                m.bias.zero_()
        elif isinstance(m, nn.Embedding):
            _draw_(m.weight, 0.0, 1.0, generator)
        elif isinstance(m, nn.BatchNorm1d | nn.BatchNorm2d):
            if m.weight is not None:
                _draw_(m.weight, 1.0, 0.02, generator)
            if m.bias is not None:
                m.bias.zero_()
            if m.track_running_stats:
                m.reset_running_stats()
    return gen


def build_generator(*, nz: int = 100, ngf: int = 64, image_size: int, channels: int, num_classes: int = 0) -> Generator:
    """The FERD generator for ``channels`` x ``image_size`` x ``image_size`` images (class-conditional
    on ``num_classes`` labels when > 0)."""
    return Generator(nz=nz, ngf=ngf, image_size=image_size, channels=channels, num_classes=num_classes)
