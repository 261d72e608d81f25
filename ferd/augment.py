"""Data augmentation for synthetic images (FERD's ``std_aug``, §2.1/§2.7, adapted per dataset).

A random shift by up to ``pad`` pixels (reflect-pad, then crop back at a per-sample offset) and an
optional horizontal flip. The paper uses RandomCrop(pad 4) + flip on CIFAR; flips are wrong for
Fashion-MNIST (every shoe faces one way), hence the switch. Offsets and flips are drawn from an
explicit generator, on that generator's device (the compute device in the hot loops, see
``ferd.runtime.device_generator``), so a run is reproducible and nothing is copied or synchronised
per step; the draw is split from the application so that two tensors (an image and its cached
adversarial version) can get the same augmentation. With ``pad = 0`` and flips off nothing is drawn.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

AugmentParams = tuple[Tensor | None, Tensor | None, Tensor | None]


def augment_params(n: int, pad: int, flip: bool, generator: torch.Generator | None) -> AugmentParams:
    """Per-sample crop offsets (rows, cols in [0, 2·pad]; one [2, n] draw), then flip flags (p = 1/2).

    Drawn on ``generator``'s device (the CPU for ``None``). Nothing is drawn (and ``None`` returned
    in its place) for ``pad = 0`` / ``flip = False``.
    """
    if pad < 0:
        raise ValueError(f"augment: pad must be >= 0, got {pad}")
    device = generator.device if generator is not None else None
    oy = ox = flips = None
    if pad > 0:
        oy, ox = torch.randint(0, 2 * pad + 1, (2, n), generator=generator, device=device)
    if flip:
        flips = torch.rand(n, generator=generator, device=device) < 0.5
    return oy, ox, flips


def apply_augment(x: Tensor, pad: int, params: AugmentParams) -> Tensor:
    """Reflect-pad ``x`` [B,C,H,W] by ``pad`` (needs pad < H, W), crop back at the offsets, flip where flagged.

    Differentiable with respect to ``x``; no host synchronisation (flips are applied by ``torch.where``).
    """
    if x.ndim != 4:
        raise ValueError(f"augment: expected images [B, C, H, W], got {tuple(x.shape)}")
    oy, ox, flips = (None if p is None else p.to(x.device) for p in params)
    n, c, h, w = x.shape
    if pad > 0:
        if pad >= h or pad >= w:
            raise ValueError(f"augment: reflect padding needs pad < image size, got pad {pad} for {h}x{w}")
        if oy is None or ox is None:
            raise ValueError(f"augment: pad {pad} needs crop offsets; draw them with augment_params")
        padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]
        b = torch.arange(n, device=x.device)[:, None, None, None]
        ch = torch.arange(c, device=x.device)[None, :, None, None]
        x = padded[b, ch, rows, cols]
    if flips is not None:
        x = torch.where(flips[:, None, None, None], x.flip(3), x)
    return x


def augment(x: Tensor, pad: int, flip: bool, generator: torch.Generator | None) -> Tensor:
    """Random shift by up to ``pad`` px and optional flip; ``x`` itself when both are off."""
    if pad == 0 and not flip:
        return x
    return apply_augment(x, pad, augment_params(x.shape[0], pad, flip, generator))
