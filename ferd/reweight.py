"""Class proportions p from per-class fragility D (method reference §2.2; project choice §9 #1).

* ``softmax`` (the paper, project default): p = softmax(D / τ), τ = 1 by default;
* ``minmax`` (the reference code): p̃_c = min_p + (max_p − min_p)·(D_c − min D)/(max D − min D + 1e-8),
  p = p̃ / Σ p̃ (the code's bounds are 0.05 and 0.20);
* ``uniform`` (ablation): p = 1/C.

:func:`smooth_fragility` is the project option ``reweight.momentum``: a running average of D across
epochs, D ← m·D_prev + (1 − m)·D_cur, which damps the generator noise in a single epoch's D.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ferd.config import ReweightConfig

__all__ = ["class_proportions", "fill_absent", "initial_fragility", "smooth_fragility"]


def _as_fragility(D: Tensor) -> Tensor:
    d = torch.as_tensor(D).detach().to(torch.float64).cpu()
    if d.ndim != 1 or d.numel() == 0:
        raise ValueError(f"fragility D must be a non-empty 1-D tensor, got shape {tuple(d.shape)}")
    if not bool(torch.isfinite(d).all()):
        raise ValueError(f"fragility D must be finite, got {d.tolist()}")
    return d


def class_proportions(D: Tensor, cfg: ReweightConfig) -> Tensor:
    """The class-sampling distribution p (float64 ``[C]``, sums to 1); more fragile classes weigh more.

    With ``cfg.floor`` = f > 0, p ← f/C + (1 − f)·p: every class keeps at least f/C of the pool.
    """
    d = _as_fragility(D)
    if cfg.method == "softmax":
        p = torch.softmax(d / cfg.tau, dim=0)
    elif cfg.method == "minmax":
        scaled = cfg.min_p + (cfg.max_p - cfg.min_p) * (d - d.min()) / (d.max() - d.min() + 1e-8)
        p = scaled / scaled.sum()
    elif cfg.method == "uniform":
        return torch.full_like(d, 1.0 / d.numel())
    else:
        raise ValueError(f"unknown reweighting method {cfg.method!r}; expected softmax, minmax or uniform")
    if cfg.floor > 0:
        p = cfg.floor / d.numel() + (1.0 - cfg.floor) * p
    return p


def fill_absent(current: Tensor, present: Tensor, previous: Tensor | None) -> Tensor:
    """D with every class that had no (counted) sample this epoch set to its previous value, or, without
    one, to the mean over the present classes: an absent class is neither starved (D = 0 under a
    softmax) nor promoted by a value it never earned."""
    cur = _as_fragility(current)
    present = torch.as_tensor(present, dtype=torch.bool).cpu()
    if bool(present.all()):
        return cur
    fill = cur[present].mean() if bool(present.any()) else torch.zeros((), dtype=cur.dtype)
    fill = torch.full_like(cur, float(fill)) if previous is None else _as_fragility(previous)
    return torch.where(present, cur, fill)


def initial_fragility(arrays: dict, signal: str) -> Tensor:
    """The D behind the first epoch's p, from the probe file's arrays (§2.2: before any synthesis).

    ``teacher``: the teacher's fragility on the synthetic probe set (``D``, the paper). ``student``: no
    student exists yet, so D = 0 (p uniform under every map). ``oracle``: the teacher's fragility on
    real images (``real_D``; needs ``probe.real_split``).
    """
    from ferd.errors import ConfigError

    if signal == "teacher":
        return _as_fragility(torch.as_tensor(arrays["D"]))
    if signal == "student":
        return torch.zeros(len(arrays["D"]), dtype=torch.float64)
    if signal == "oracle":
        if "real_D" not in arrays:
            raise ConfigError("reweight.signal: oracle needs the teacher's fragility on real images; set probe.real_split "
                              "to train and rerun `ferd probe`")
        return _as_fragility(torch.as_tensor(arrays["real_D"]))
    raise ValueError(f"unknown reweighting signal {signal!r}")


def smooth_fragility(previous: Tensor | None, current: Tensor, momentum: float) -> Tensor:
    """D ← m·D_prev + (1 − m)·D_cur (float64); ``current`` alone when ``previous`` is None or m = 0."""
    cur = _as_fragility(current)
    if not 0.0 <= momentum < 1.0:
        raise ValueError(f"momentum must be in [0, 1), got {momentum}")
    if previous is None or momentum == 0.0:
        return cur.clone()
    prev = _as_fragility(previous)
    if prev.shape != cur.shape:
        raise ValueError(f"previous and current fragility differ in length ({prev.numel()} vs {cur.numel()})")
    return momentum * prev + (1.0 - momentum) * cur
