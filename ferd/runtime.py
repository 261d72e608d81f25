"""Seeds, devices, threads and the progress-callback protocol shared by all stages.

One ``seed`` lives in params.yaml; each stage derives its own seed from it and its name, so stages
do not share random streams and a stage's randomness does not depend on which stages ran before.
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
