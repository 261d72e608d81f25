"""Per-class robustness metrics (§5 of the method reference; FERD reports these per attack).

* per-class accuracy: the fraction of each class's test points classified correctly;
* ``avg``: the overall (sample-weighted) accuracy when given, else the mean of the per-class
  accuracies (equal for a class-balanced evaluation set);
* ``worst`` / ``worst_class``: the lowest per-class accuracy and its class (the first on ties);
* ``worst10``: the mean over the ``ceil(0.1 * C)`` lowest classes, reported only for ``C >= 100``
  (CIFAR-100, Tiny-ImageNet; for 10 classes it would just repeat ``worst``);
* NSD, normalised standard deviation (ABSLD): the population standard deviation of the per-class
  accuracies divided by their mean. NaN when the mean is 0 (every class at 0 %: the spread is
  undefined, not infinite).

:func:`check_ordering` and :func:`check_monotone` are sanity checks whose warnings flag numbers that
should not be trusted (a stronger attack leaving *more* accuracy, or accuracy rising with eps, is a
classic symptom of gradient masking or of a broken attack).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["per_class_accuracy", "Summary", "summarize", "check_ordering", "check_monotone", "ORDERING"]


def per_class_accuracy(pred: Tensor, y: Tensor, num_classes: int) -> Tensor:
    """Accuracy of each class, float64 ``[num_classes]``.

    Raises ``ValueError`` when a class has no samples: the evaluation must cover every class.
    """
    if not (isinstance(num_classes, int) and not isinstance(num_classes, bool) and num_classes >= 1):
        raise ValueError(f"per_class_accuracy: num_classes must be an integer >= 1, got {num_classes!r}")
    pred = torch.as_tensor(pred)
    y = torch.as_tensor(y)
    if pred.ndim != 1 or y.ndim != 1 or pred.shape != y.shape:
        raise ValueError(f"per_class_accuracy: pred and y must be 1-D of equal length, got "
                         f"{tuple(pred.shape)} and {tuple(y.shape)}")
    if pred.is_floating_point() or y.is_floating_point():
        raise ValueError("per_class_accuracy: pred and y must be integer labels")
    pred, y = pred.long().cpu(), y.long().cpu()
    if y.numel() and (y.min().item() < 0 or y.max().item() >= num_classes):
        raise ValueError(f"per_class_accuracy: labels must be in [0, {num_classes}), "
                         f"got [{y.min().item()}, {y.max().item()}]")
    counts = torch.bincount(y, minlength=num_classes)
    empty = torch.nonzero(counts == 0).flatten().tolist()
    if empty:
        shown = ", ".join(map(str, empty[:10])) + (" ..." if len(empty) > 10 else "")
        raise ValueError(f"per_class_accuracy: {len(empty)} class(es) have no samples ({shown}); "
                         "the evaluation set must cover every class")
    correct = torch.bincount(y[pred == y], minlength=num_classes)
    return correct.double() / counts.double()


@dataclass(frozen=True)
class Summary:
    """Headline numbers of one attack (accuracies as fractions in [0, 1])."""

    avg: float
    worst: float
    worst_class: int
    worst10: float | None  # mean of the ceil(0.1*C) lowest classes; None when C < 100
    nsd: float  # population std / mean of the per-class accuracies; NaN when the mean is 0


def summarize(per_class: Tensor | Sequence[float], *, overall: float | None = None) -> Summary:
    """Summarise per-class accuracies (see the module docstring for the definitions)."""
    acc = torch.as_tensor(per_class, dtype=torch.float64).detach().cpu()
    if acc.ndim != 1 or acc.numel() == 0:
        raise ValueError(f"summarize: expected a non-empty 1-D vector of per-class accuracies, got shape "
                         f"{tuple(acc.shape)}")
    if torch.isnan(acc).any() or (acc < 0).any() or (acc > 1).any():
        raise ValueError("summarize: per-class accuracies must be in [0, 1] (no NaN)")
    if overall is not None and not (0.0 <= float(overall) <= 1.0):
        raise ValueError(f"summarize: overall accuracy must be in [0, 1], got {overall!r}")
    c = acc.numel()
    mean = acc.mean().item()
    worst, worst_class = torch.min(acc, dim=0)
    # torch.min on ties may return any index; take the first explicitly
    worst_class = int(torch.nonzero(acc == worst).flatten()[0].item())
    worst10 = None
    if c >= 100:
        k = -(-c // 10)  # ceil(0.1 * C) in integer arithmetic
        worst10 = torch.sort(acc).values[:k].mean().item()
    std = acc.std(unbiased=False).item()
    nsd = std / mean if mean > 0 else math.nan
    return Summary(
        avg=float(overall) if overall is not None else mean,
        worst=worst.item(),
        worst_class=worst_class,
        worst10=worst10,
        nsd=nsd,
    )


#: ``(weaker, stronger)`` attack pairs: accuracy under ``stronger`` must not exceed ``weaker``'s.
ORDERING: tuple[tuple[str, str], ...] = (
    ("clean", "fgsm"),
    ("clean", "pgd"),
    ("clean", "cw"),
    ("clean", "autoattack"),
    ("fgsm", "pgd"),
    ("pgd", "autoattack"),
    ("cw", "autoattack"),
)


def check_ordering(acc_by_attack: Mapping[str, float], tol: float = 0.01) -> list[str]:
    """Warnings for violated orderings ``clean >= fgsm >= pgd >= autoattack`` and ``cw >= autoattack``.

    Keys are ``clean``, ``fgsm``, ``pgd``, ``cw``, ``autoattack`` (absent ones are skipped, others
    ignored); values are accuracies in [0, 1]. A pair is violated when the stronger attack's
    accuracy exceeds the weaker one's by more than ``tol``.
    """
    if tol < 0:
        raise ValueError(f"check_ordering: tol must be >= 0, got {tol!r}")
    warnings: list[str] = []
    for weak, strong in ORDERING:
        if weak in acc_by_attack and strong in acc_by_attack:
            a, b = float(acc_by_attack[weak]), float(acc_by_attack[strong])
            if b > a + tol:
                warnings.append(
                    f"accuracy under {strong} ({b:.2%}) exceeds accuracy under {weak} ({a:.2%}) by more than "
                    f"{tol:.2%}: expected {weak} >= {strong}; this may indicate gradient masking or a broken attack"
                )
    return warnings


def check_monotone(acc_by_eps: Mapping[float, float], tol: float = 0.01) -> list[str]:
    """Warnings where accuracy rises (by more than ``tol``) from one eps to the next larger eps."""
    if tol < 0:
        raise ValueError(f"check_monotone: tol must be >= 0, got {tol!r}")
    warnings: list[str] = []
    items = sorted((float(e), float(a)) for e, a in acc_by_eps.items())
    for (e0, a0), (e1, a1) in zip(items, items[1:], strict=False):
        if a1 > a0 + tol:
            warnings.append(
                f"accuracy rises from {a0:.2%} at eps={e0:.4g} to {a1:.2%} at eps={e1:.4g}: a larger eps-ball "
                "must not leave more accuracy; this may indicate gradient masking or a broken attack"
            )
    return warnings
