"""Per-class fragility D of the teacher (method reference §2.2).

    x_i^adv = PGD_T(x_i, y_i)          (CE, uniform random start, teacher frozen in eval mode)
    m_i     = f^T(x_i^adv)_{y_i} − max_{j≠y_i} f^T(x_i^adv)_j        (negative = attack succeeded)
    D_c     = (1/N_c) Σ_{i: y_i = c} (−m_i)                           (larger = less robust)

* :func:`fragility` computes D from margins; ``agreed`` restricts the average to the samples the
  teacher labels right on clean inputs (``probe.fragility: agreed``, a project option). A class with
  no (counted) samples gets D_c = 0, as in the reference code.
* :func:`probe_teacher` runs the attack (``attacks.pgd`` inside ``attacks.frozen_eval``) and returns
  margins, clean/adversarial predictions and per-class summaries.
* :func:`probe_set` synthesises the class-balanced probe set with the FAE synthesiser
  (``fae.synthesize_epoch`` with fixed labels).
* :func:`rank_correlation` (Spearman, average ranks for ties) compares synthetic D with the
  teacher's per-class fragility on real data, a diagnostic of the stage summary.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ferd.attacks import frozen_eval, margin, model_device, pgd
from ferd.config import FaeConfig
from ferd.fae import synthesize_epoch
from ferd.runtime import Progress, device_generator, no_progress

__all__ = ["ProbeResult", "fragility", "probe_set", "probe_teacher", "rank_correlation"]


def _class_mean(values: Tensor, y: Tensor, num_classes: int, counted: Tensor | None = None) -> Tensor:
    """Per-class mean of ``values`` (float64 ``[C]``) over the counted samples; 0 for an empty class."""
    values = values.detach().to(torch.float64).cpu().reshape(-1)
    y = y.detach().to(torch.long).cpu().reshape(-1)
    if values.shape != y.shape:
        raise ValueError(f"expected one value per label, got {values.numel()} values for {y.numel()} labels")
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got range [{int(y.min())}, {int(y.max())}]")
    weight = torch.ones_like(values)
    if counted is not None:
        counted = counted.detach().cpu().reshape(-1)
        if counted.shape != y.shape or counted.dtype != torch.bool:
            raise ValueError("the agreed mask must be a bool tensor with one entry per sample")
        weight = counted.to(torch.float64)
    sums = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, y, values * weight)
    counts = torch.zeros(num_classes, dtype=torch.float64).index_add_(0, y, weight)
    return torch.where(counts > 0, sums / counts.clamp_min(1.0), torch.zeros_like(sums))


def fragility(margins: Tensor, y: Tensor, num_classes: int, *, agreed: Tensor | None = None) -> Tensor:
    """D_c = mean over the samples of class c of −margin, float64 ``[C]`` (§2.2).

    With ``agreed`` (bool ``[N]``) only the samples where it is true count. A class with no counted
    sample gets D_c = 0 (the reference code's behaviour: it is then treated as average-ish rather
    than dropped, which keeps p well defined).
    """
    return _class_mean(-margins.detach().to(torch.float64), y, num_classes, agreed)


@dataclass
class ProbeResult:
    """The teacher probe: per-sample margins and predictions, per-class fragility and summaries.

    ``margins`` float32 ``[N]`` (adversarial margins), ``clean_pred`` / ``adv_pred`` int64 ``[N]``,
    ``D`` float64 ``[C]``, ``per_class_adv_acc`` float64 ``[C]`` (PGD accuracy), and
    ``per_class_agreement`` float64 ``[C]`` (clean accuracy: the teacher agrees with y). Classes
    without samples get 0 in every per-class tensor.
    """

    margins: Tensor
    clean_pred: Tensor
    adv_pred: Tensor
    D: Tensor
    per_class_adv_acc: Tensor
    per_class_agreement: Tensor


def probe_teacher(
    teacher: nn.Module,
    x: Tensor,
    y: Tensor,
    num_classes: int,
    *,
    eps: float,
    alpha: float,
    steps: int,
    mode: Literal["all", "agreed"] = "all",
    generator: torch.Generator | None = None,
    batch_size: int = 256,
) -> ProbeResult:
    """PGD-``steps`` (CE, random start from ``generator``) on the frozen teacher and the fragility D.

    ``x``/``y`` may live on the CPU; batches move to the teacher's device, and the random starts are
    drawn there (``ferd.runtime.device_generator``: ``generator`` itself on the CPU). ``mode="agreed"``
    computes D over the samples the teacher classifies right on clean inputs only. Results are CPU
    tensors, read back once after the last batch.
    """
    if mode not in ("all", "agreed"):
        raise ValueError(f"probe_teacher: mode must be 'all' or 'agreed', got {mode!r}")
    if batch_size < 1:
        raise ValueError(f"probe_teacher: batch_size must be >= 1, got {batch_size}")
    y = y.detach().to(torch.long).cpu()
    n = y.numel()
    device = model_device(teacher)
    pgd_generator = device_generator(generator, device)  # the CPU generator itself on the CPU
    margins_d, clean_d, adv_d = [], [], []
    with frozen_eval(teacher):
        for start in range(0, n, batch_size):
            xb = x[start:start + batch_size].detach().to(device)
            yb = y[start:start + batch_size].to(device)
            x_adv = pgd(teacher, xb, yb, eps=eps, alpha=alpha, steps=steps, generator=pgd_generator)
            with torch.no_grad():
                clean_d.append(teacher(xb).argmax(dim=1))
                logits = teacher(x_adv)
                margins_d.append(margin(logits, yb).float())
                adv_d.append(logits.argmax(dim=1))
    # one read-back after all batches (no host sync inside the loop)
    margins = torch.cat(margins_d).cpu() if n else torch.empty(0, dtype=torch.float32)
    clean_pred = torch.cat(clean_d).cpu() if n else torch.empty(0, dtype=torch.long)
    adv_pred = torch.cat(adv_d).cpu() if n else torch.empty(0, dtype=torch.long)
    agree = clean_pred == y
    return ProbeResult(
        margins=margins,
        clean_pred=clean_pred,
        adv_pred=adv_pred,
        D=fragility(margins, y, num_classes, agreed=agree if mode == "agreed" else None),
        per_class_adv_acc=_class_mean((adv_pred == y).to(torch.float64), y, num_classes),
        per_class_agreement=_class_mean(agree.to(torch.float64), y, num_classes),
    )


def probe_set(
    teacher: nn.Module,
    student: nn.Module | None,
    cfg: FaeConfig,
    per_class: int,
    num_classes: int,
    *,
    image_shape: tuple[int, int, int],
    generator: torch.Generator,
    device: str | torch.device,
    progress: Progress = no_progress,
) -> tuple[Tensor, Tensor]:
    """A class-balanced synthetic probe set: ``per_class`` images of every class, made by the FAE
    synthesiser with fixed labels, in chunks of at most ``cfg.batch_size`` images.

    Labels are dealt round-robin over the chunks (each chunk is as class-balanced as it can be, which
    keeps the BN-statistics term meaningful), sorted within a chunk. Returns CPU ``(x, y)`` sorted by
    label (stable). Progress is reported as ``probe set k/K``.
    """
    if per_class < 1 or num_classes < 1:
        raise ValueError(f"probe_set: per_class and num_classes must be >= 1, got {per_class}, {num_classes}")
    labels = torch.arange(num_classes).repeat(per_class)  # 0, 1, ..., C-1, 0, 1, ...
    chunks = list(labels.split(cfg.batch_size))
    uniform = torch.full((num_classes,), 1.0 / num_classes, dtype=torch.float64)
    xs, ys = [], []
    for k, chunk in enumerate(chunks):
        task = f"probe set {k + 1}/{len(chunks)}"

        def report(_task: str, done: int, total: int, info: Mapping[str, float], task: str = task) -> None:
            progress(task, done, total, info)

        out = synthesize_epoch(teacher, student, uniform, cfg, image_shape=image_shape, generator=generator,
                               device=device, labels=chunk.sort().values, progress=report, epoch=k)
        xs.append(out.x)
        ys.append(out.y)
    x, y = torch.cat(xs), torch.cat(ys)
    order = torch.sort(y, stable=True).indices
    return x[order], y[order]


def _average_ranks(values: Sequence[float] | Tensor) -> Tensor:
    v = torch.as_tensor(values, dtype=torch.float64).reshape(-1)
    order = torch.argsort(v, stable=True)
    sorted_v = v[order]
    ranks = torch.empty_like(v)
    i, n = 0, v.numel()
    while i < n:
        j = i
        while j + 1 < n and sorted_v[j + 1] == sorted_v[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0  # average of ranks i+1 .. j+1
        i = j + 1
    return ranks


def rank_correlation(a: Sequence[float] | Tensor, b: Sequence[float] | Tensor) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN if either side is constant or has < 2 values."""
    ra, rb = _average_ranks(a), _average_ranks(b)
    if ra.shape != rb.shape:
        raise ValueError(f"rank_correlation: lengths differ ({ra.numel()} vs {rb.numel()})")
    if ra.numel() < 2:
        return math.nan
    da, db = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((da * da).sum()) * float((db * db).sum()))
    if denom == 0.0:
        return math.nan
    return float((da * db).sum()) / denom


def run_probe(teacher: nn.Module, params: Any, info: Any, *, device: Any, progress: Any = None) -> tuple[dict, dict]:
    """The ``probe`` stage: synthetic probe set → PGD on the teacher → D; optionally a real split too.

    Returns (arrays, attrs) for the probe HDF5: x, y, margins, clean_pred, adv_pred, D,
    per_class_adv_acc, per_class_agreement (and real_* when ``probe.real_split`` is not ``none``),
    plus the agreement rate and the synthetic-vs-real rank correlation.
    """
    from ferd.config import as_dict
    from ferd.data import class_balanced_subset, load_split
    from ferd.runtime import torch_generator

    progress = progress or no_progress
    cfg = params.probe
    eps = params.data.eps
    x, y = probe_set(teacher, None, params.fae, cfg.per_class, info.num_classes, image_shape=tuple(info.image_shape),
                     generator=torch_generator(params.seed, "probe/set"), device=device, progress=progress)
    res = probe_teacher(teacher, x, y, info.num_classes, eps=eps, alpha=cfg.step_size * eps, steps=cfg.steps,
                        mode=cfg.fragility, generator=torch_generator(params.seed, "probe/pgd"))
    arrays = {
        "x": x.cpu().numpy(), "y": y.cpu().numpy(), "margins": res.margins.numpy(),
        "clean_pred": res.clean_pred.numpy(), "adv_pred": res.adv_pred.numpy(), "D": res.D.numpy(),
        "per_class_adv_acc": res.per_class_adv_acc.numpy(), "per_class_agreement": res.per_class_agreement.numpy(),
    }
    attrs = {"num_classes": info.num_classes, "class_names": list(info.class_names), "seed": params.seed,
             "eps": eps, "params": {"probe": as_dict(cfg), "fae": as_dict(params.fae)},
             "agreement": float((res.clean_pred == y.cpu()).double().mean())}
    if cfg.real_split != "none":
        real = class_balanced_subset(load_split(params.data, cfg.real_split), cfg.real_per_class, seed=params.seed)
        rres = probe_teacher(teacher, real.images(), real.y, info.num_classes, eps=eps, alpha=cfg.step_size * eps,
                             steps=cfg.steps, mode=cfg.fragility, generator=torch_generator(params.seed, "probe/real"))
        arrays["real_D"] = rres.D.numpy()
        arrays["real_per_class_adv_acc"] = rres.per_class_adv_acc.numpy()
        attrs["rank_correlation"] = rank_correlation(res.D, rres.D)
        attrs["real_split"] = cfg.real_split
    return arrays, attrs
