"""Seeds, devices, threads and the progress-callback protocol shared by all stages.

One ``seed`` lives in params.yaml; each stage derives its own seed from it and its name, so stages
do not share random streams and a stage's randomness does not depend on which stages ran before.

Per-step random numbers of the hot loops (IB noise, UTAE start noise, augmentation, batch indices)
are drawn on the compute device (:func:`device_generator`): on the CPU that is the stage's own CPU
generator, so CPU runs draw exactly what they drew before device generators existed; on CUDA it is
a CUDA generator seeded from the CPU generator, so a seed gives the same artifacts on the same
device. ``runtime.precision: bf16`` runs the network forward passes of the hot loops under CUDA
autocast (:func:`autocast`); it is refused on other devices (:func:`check_precision`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

#: ``progress(task, done, total, info)``: ``ferd`` functions report progress through this; stages
#: pass a rich progress bar, tests pass nothing. ``info`` carries a few live numbers (loss, acc).
Progress = Callable[[str, int, int, Mapping[str, float]], None]


def no_progress(task: str, done: int, total: int, info: Mapping[str, float]) -> None:
    """The default progress callback: does nothing."""


def derive_seed(seed: int, name: str) -> int:
    """A 63-bit seed for stage/purpose ``name``, stable across Python runs and platforms."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def torch_generator(seed: int, name: str) -> Any:
    """A CPU ``torch.Generator`` seeded with ``derive_seed(seed, name)``."""
    import torch

    return torch.Generator().manual_seed(derive_seed(seed, name))


def device_generator(generator: Any, device: Any) -> Any:
    """The generator for per-step draws on ``device``, derived from the CPU ``generator``.

    Same device type as ``generator`` (the CPU case): ``generator`` itself, so the draws and their
    order are those of the CPU code. Another device (CUDA): a new generator on that device, seeded
    with one 63-bit draw from ``generator``; the CPU stream moves on by that draw, so successive
    calls (and a resumed run, which restores the CPU state) get distinct, reproducible streams.
    ``generator=None`` stays None (torch's default generators).
    """
    import torch

    if generator is None:
        return None
    device = torch.device(device)
    if device.type == generator.device.type:
        return generator
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    seed = int(torch.randint(0, 2**63 - 1, (1,), generator=generator, dtype=torch.int64))
    return torch.Generator(device=device).manual_seed(seed)


PRECISIONS = ("fp32", "bf16")


def check_precision(precision: str, device: Any) -> None:
    """Refuse ``bf16`` anywhere but CUDA (on the CPU it is several times slower here than fp32)."""
    from ferd.errors import ConfigError

    if precision not in PRECISIONS:
        raise ConfigError(f"runtime.precision: expected fp32 or bf16, got {precision!r}")
    if precision == "bf16" and getattr(device, "type", str(device)) != "cuda":
        raise ConfigError(f"runtime.precision is bf16 but the device is {device}: bf16 autocast only runs on CUDA "
                          "(on the CPU it is slower); set runtime.precision: fp32")


def autocast(device: Any, precision: str = "fp32") -> Any:
    """A context manager: bf16 autocast on CUDA for ``precision == "bf16"``, else nothing.

    Wraps network forward passes only; losses, optimiser state and kept images stay float32 (the
    callers cast logits back with ``.float()``, a no-op in fp32).
    """
    import contextlib

    import torch

    if precision == "bf16" and torch.device(device).type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def resolve_device(spec: str) -> Any:
    """``auto`` -> CUDA when available, else CPU; anything else as given (validated by torch)."""
    import torch

    from ferd.errors import ConfigError

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"runtime.device is {spec!r} but CUDA is not available; use auto or cpu")
    return device


def configure_torch(threads: int, seed: int, name: str) -> None:
    """Set CPU threads (0 = torch's default) and seed torch's global RNG for stage ``name``."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    torch.manual_seed(derive_seed(seed, name))
