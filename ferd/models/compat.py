"""Loading third-party checkpoints (kuangliu pytorch-cifar, TRADES, RobustBench) into our models.

``adapt_state_dict(state, model)`` turns whatever ``torch.load(path, weights_only=True)`` returned
into a state dict that ``model.load_state_dict(..., strict=True)`` accepts, or raises a one-line
``SourceError`` that says what does not match:

* unwraps ``{"state_dict": ...}``, ``{"net": ...}``, ``{"model": ...}`` (also
  ``"model_state_dict"``), possibly nested;
* strips ``module.`` (DataParallel) and ``model.`` prefixes;
* drops the TRADES/RobustBench WRN's unused ``sub_block1.*`` keys;
* drops ``num_batches_tracked`` buffers the model does not have, and fills in those the checkpoint
  lacks (old PyTorch) from the model;
* casts floating tensors to float32.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from ferd.errors import SourceError

_WRAPPER_KEYS = ("state_dict", "model_state_dict", "net", "model")
_PREFIXES = ("module.", "model.")
_HINT = "check teacher.arch (and teacher.width) match the checkpoint"
_SHOW = 3  # names shown per category in an error message


def _unwrap(state: Any) -> Mapping[str, Any]:
    if isinstance(state, nn.Module):
        return state.state_dict()
    for _ in range(4):  # nested wrappers, e.g. {"model": {"state_dict": ...}}
        if not isinstance(state, Mapping):
            break
        inner = next((state[k] for k in _WRAPPER_KEYS if k in state and isinstance(state[k], Mapping)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, Mapping):
        raise SourceError(f"checkpoint holds a {type(state).__name__}, not a state dict; {_HINT}")
    return state


def _strip(key: str, wanted: Mapping[str, Any]) -> str:
    while key not in wanted:
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix) :]
                break
        else:
            return key
    return key


def _names(keys: list[str]) -> str:
    shown = ", ".join(keys[:_SHOW])
    return shown + (", ..." if len(keys) > _SHOW else "")


def adapt_state_dict(state: Mapping[str, torch.Tensor] | Any, model: nn.Module) -> dict[str, torch.Tensor]:
    """``state`` (raw checkpoint object) -> a state dict with exactly ``model``'s keys and shapes."""
    raw = _unwrap(state)
    target = model.state_dict()
    out: dict[str, torch.Tensor] = {}
    for key, value in raw.items():
        if not isinstance(key, str):
            raise SourceError(f"checkpoint has a non-string key {key!r}; {_HINT}")
        name = _strip(key, target)
        if name.startswith("sub_block1.") or (name.endswith("num_batches_tracked") and name not in target):
            continue
        if not isinstance(value, torch.Tensor):
            raise SourceError(f"checkpoint entry {key!r} is a {type(value).__name__}, not a tensor; {_HINT}")
        if name in out:
            raise SourceError(f"checkpoint has key {name!r} twice (with and without a prefix); {_HINT}")
        out[name] = value.float() if value.is_floating_point() else value
    for name, value in target.items():  # checkpoints from PyTorch < 0.4.1 lack these buffers
        if name.endswith("num_batches_tracked") and name not in out:
            out[name] = value.detach().clone()
    missing = [k for k in target if k not in out]
    unexpected = [k for k in out if k not in target]
    misshaped = [
        f"{k} {list(out[k].shape)} vs {list(target[k].shape)}"
        for k in target
        if k in out and tuple(out[k].shape) != tuple(target[k].shape)
    ]
    if missing or unexpected or misshaped:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys ({_names(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys ({_names(unexpected)})")
        if misshaped:
            parts.append(f"{len(misshaped)} mis-shaped keys ({_names(misshaped)}, checkpoint vs model)")
        raise SourceError(f"checkpoint does not fit {type(model).__name__}: {'; '.join(parts)}; {_HINT}")
    return {k: out[k] for k in target}
