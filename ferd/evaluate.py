"""Robustness evaluation of a model on the test split (method reference §5; project defaults §9 #7).

Clean, FGSM, PGD-k (α = step·ε, random start) and CW∞-k (PGD on the CW margin loss) run on the
test split (or a class-balanced cap of it); AutoAttack, which is costly, runs on a class-balanced
subset through the reference implementation, and PGD-k is reported on that subset too
(``pgd_aa``: the same images, so AutoAttack ≤ PGD can be checked per class). For every attack: per-class accuracy, average
(sample-weighted), worst class, worst-10 % of classes (≥ 100 classes) and NSD (std/mean over
classes). Two sanity checks flag gradient masking: accuracy must fall clean ≥ FGSM ≥ PGD, and
PGD/CW ≥ AutoAttack on the same images; PGD accuracy must fall as ε grows (the sweep).

The model is attacked frozen in eval mode on [0,1] inputs; no checkpoint selection happens here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from ferd.config import EvaluateConfig
from ferd.runtime import Progress, no_progress, torch_generator

ATTACKS = ("clean", "fgsm", "pgd", "cw")


@dataclass
class EvalResult:
    """Per-class accuracies (attack -> list over classes) and their summaries."""

    class_names: list[str]
    per_class: dict[str, list[float]]
    summary: dict[str, dict[str, Any]]
    images: dict[str, int]
    eps: float
    autoattack_version: str
    eps_sweep: dict[float, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def flat_metrics(self) -> dict[str, Any]:
        """Flat keys for ``dvc metrics``: ``<attack>_<avg|worst|worst10|nsd>`` and provenance."""
        out: dict[str, Any] = {"eps": self.eps, "autoattack_version": self.autoattack_version,
                               "warnings": len(self.warnings)}
        for attack, s in self.summary.items():
            out[f"{attack}_avg"] = _finite(s["avg"])
            out[f"{attack}_worst"] = _finite(s["worst"])
            out[f"{attack}_worst_class"] = self.class_names[s["worst_class"]]
            out[f"{attack}_nsd"] = _finite(s["nsd"])
            if s["worst10"] is not None:
                out[f"{attack}_worst10"] = _finite(s["worst10"])
            out[f"{attack}_images"] = self.images[attack]
        for mult, acc in sorted(self.eps_sweep.items()):
            out[f"pgd_eps_x{mult:g}_avg"] = round(acc, 6)
        return out

    def per_class_rows(self) -> list[dict[str, Any]]:
        """One row per class (``class``, ``name``, then one column per attack), for ``dvc plots``."""
        rows = []
        for c, name in enumerate(self.class_names):
            row: dict[str, Any] = {"class": c, "name": name}
            for attack, accs in self.per_class.items():
                row[attack] = round(accs[c], 6)  # NaN (transfer where the teacher is at 0) is written "nan"
            rows.append(row)
        return rows


def _finite(v: float) -> float | None:
    """JSON has no NaN: an undefined value (NSD when every class is at 0) is written as null."""
    return round(v, 6) if math.isfinite(v) else None


def _summary_dict(per_class: Any, overall: float) -> dict[str, Any]:
    from ferd.metrics import summarize

    s = summarize(per_class, overall=overall)
    return {"avg": s.avg, "worst": s.worst, "worst_class": s.worst_class, "worst10": s.worst10, "nsd": s.nsd}


def _transfer_summary(transfer: Any, overall: float) -> dict[str, Any]:
    """Transfer is a ratio, not an accuracy (it can exceed 1): avg = overall ratio, worst over defined classes."""
    import torch

    t = torch.as_tensor(transfer, dtype=torch.float64)
    defined = torch.nonzero(~torch.isnan(t)).flatten()
    if len(defined) == 0:
        return {"avg": overall, "worst": math.nan, "worst_class": 0, "worst10": None, "nsd": math.nan}
    worst_class = int(defined[torch.argmin(t[defined])])
    return {"avg": overall, "worst": float(t[worst_class]), "worst_class": worst_class, "worst10": None, "nsd": math.nan}


def evaluate_model(
    model: Any,
    test: Any,
    cfg: EvaluateConfig,
    *,
    eps: float,
    seed: int,
    progress: Progress = no_progress,
    reference: Any = None,
) -> EvalResult:
    """Attack ``model`` (frozen, eval mode) on the ImageSet ``test``; return per-class results.

    With ``reference`` (the teacher of a distilled ``model``), also ``transfer``: per class, the
    model's clean accuracy divided by the reference's on the same images (how much of what the
    teacher knows about a class reached the student; undefined, null, where the teacher is at 0).
    """
    import torch

    from ferd.attacks import autoattack_predictions, run_attack
    from ferd.data import class_balanced_indices
    from ferd.metrics import check_monotone, check_ordering, per_class_accuracy

    if cfg.per_class:
        test = test.subset(class_balanced_indices(test.y, test.num_classes, cfg.per_class, seed))
    x, y, num_classes = test.images(), test.y, test.num_classes
    settings = {
        "clean": {},
        "fgsm": {},
        "pgd": {"alpha": cfg.pgd_step_size * eps, "steps": cfg.pgd_steps},
        "cw": {"alpha": cfg.cw_step_size * eps, "steps": cfg.cw_steps},
    }
    preds: dict[str, Any] = {}
    for name, kw in settings.items():
        preds[name] = run_attack(
            model, x, y, name=name, eps=eps, batch_size=cfg.batch_size,
            generator=torch_generator(seed, f"evaluate-{name}"),
            progress=lambda done, total, _n=name: progress(_n, done, total, {}), **kw,
        )
    per_class = {name: per_class_accuracy(p, y, num_classes) for name, p in preds.items()}
    summary = {name: _summary_dict(per_class[name], float((p == y).double().mean())) for name, p in preds.items()}
    images = {name: len(y) for name in preds}
    warnings = check_ordering({n: summary[n]["avg"] for n in ATTACKS})
    if reference is not None:
        ref_pred = run_attack(reference, x, y, name="clean", eps=eps, batch_size=cfg.batch_size,
                              generator=torch_generator(seed, "evaluate-reference"))
        ref_per_class = torch.as_tensor(per_class_accuracy(ref_pred, y, num_classes), dtype=torch.float64)
        own = torch.as_tensor(per_class["clean"], dtype=torch.float64)
        transfer = torch.where(ref_per_class > 0, own / ref_per_class.clamp_min(1e-12), torch.tensor(math.nan))
        per_class["transfer"] = transfer
        ref_avg = float((ref_pred == y).double().mean())
        summary["transfer"] = _transfer_summary(transfer, summary["clean"]["avg"] / ref_avg if ref_avg > 0 else math.nan)
        images["transfer"] = len(y)

    # AutoAttack and the eps sweep on a class-balanced subset; PGD/CW are compared on the same images.
    sweep: dict[float, float] = {}
    idx = class_balanced_indices(y, num_classes, cfg.autoattack_per_class, seed)
    xs, ys = x[idx], y[idx]
    if cfg.autoattack != "off":
        device = next(iter(model.parameters())).device
        progress("autoattack", 0, 1, {"images": len(ys)})
        aa = autoattack_predictions(model, xs, ys, eps=eps, version=cfg.autoattack, batch_size=cfg.batch_size,
                                    seed=seed, device=device)
        progress("autoattack", 1, 1, {"images": len(ys)})
        per_class["autoattack"] = per_class_accuracy(aa, ys, num_classes)
        summary["autoattack"] = _summary_dict(per_class["autoattack"], float((aa == ys).double().mean()))
        images["autoattack"] = len(ys)
        # PGD-20 on exactly the AutoAttack images: the pair the reader compares (AA must not exceed it)
        pgd_aa = preds["pgd"][idx]
        per_class["pgd_aa"] = per_class_accuracy(pgd_aa, ys, num_classes)
        summary["pgd_aa"] = _summary_dict(per_class["pgd_aa"], float((pgd_aa == ys).double().mean()))
        images["pgd_aa"] = len(ys)
        same_images = {n: float((preds[n][idx] == ys).double().mean()) for n in ("pgd", "cw")}
        same_images["autoattack"] = summary["autoattack"]["avg"]
        warnings += check_ordering(same_images, tol=max(0.01, 3 / len(ys)))  # a few images of noise
    for mult in cfg.eps_sweep:
        p = run_attack(model, xs, ys, name="pgd", eps=mult * eps, alpha=cfg.pgd_step_size * mult * eps,
                       steps=cfg.pgd_steps, batch_size=cfg.batch_size,
                       generator=torch_generator(seed, f"evaluate-sweep-{mult}"),
                       progress=lambda done, total, _m=mult: progress(f"pgd at {_m:g} eps", done, total, {}))
        sweep[float(mult)] = float((p == ys).double().mean())
    warnings += check_monotone({mult * eps: acc for mult, acc in sweep.items()}, tol=max(0.01, 3 / len(ys)))
    return EvalResult(
        class_names=list(test.class_names),
        per_class={k: [float(a) for a in torch.as_tensor(v)] for k, v in per_class.items()},
        summary=summary,
        images=images,
        eps=eps,
        autoattack_version=cfg.autoattack,
        eps_sweep=sweep,
        warnings=warnings,
    )
