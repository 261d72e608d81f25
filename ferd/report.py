"""Figures and a markdown summary from the ``evaluate`` metrics (``metrics/<model>.json`` + ``_per_class.csv``).

FERD's claim is about the worst class, so the main figure shows per-class accuracy of every
evaluated model side by side, one panel per attack. Files are written atomically, PNGs without a
timestamp or software tag, so the same metrics give the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ferd.artifacts import atomic_path, load_csv, load_json, write_bytes_atomic
from ferd.errors import ArtifactError

ATTACK_LABELS = {"clean": "clean", "fgsm": "FGSM", "pgd": "PGD-20", "cw": "CW∞", "pgd_aa": "PGD-20 on the AutoAttack images",
                 "autoattack": "AutoAttack", "transfer": "transfer (student clean / teacher clean)"}
MODEL_ORDER = ("teacher", "student")


@dataclass
class ModelMetrics:
    name: str
    summary: dict[str, Any]
    classes: list[str]
    per_class: dict[str, list[float]]  # attack -> accuracy per class


def load_metrics(metrics_dir: str | Path) -> list[ModelMetrics]:
    """Every model with both ``<name>.json`` and ``<name>_per_class.csv``; teacher, student first."""
    d = Path(metrics_dir)
    names = sorted(p.name[: -len("_per_class.csv")] for p in d.glob("*_per_class.csv") if (d / f"{p.name[:-14]}.json").is_file())
    if not names:
        raise ArtifactError(f"{d}: no evaluate metrics found; run `ferd evaluate` (or `dvc repro`) first")
    names.sort(key=lambda n: (MODEL_ORDER.index(n) if n in MODEL_ORDER else len(MODEL_ORDER), n))
    out = []
    for name in names:
        rows = load_csv(d / f"{name}_per_class.csv", produced_by="evaluate")
        attacks = [a for a in ATTACK_LABELS if rows and a in rows[0]]
        try:
            per_class = {a: [float(r[a]) for r in rows] for a in attacks}
        except ValueError:
            raise ArtifactError(f"{d / f'{name}_per_class.csv'}: non-numeric accuracy; rerun `ferd evaluate`") from None
        out.append(ModelMetrics(name, load_json(d / f"{name}.json"), [r["name"] for r in rows], per_class))
    return out


def per_class_figure(models: list[ModelMetrics], path: str | Path) -> None:
    """One panel per attack; per class, one bar per model (grouped); dashed line at each model's average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    attacks = [a for a in ATTACK_LABELS if any(a in m.per_class for m in models)]
    classes = models[0].classes
    fig, axes = plt.subplots(len(attacks), 1, figsize=(max(8, 0.8 * len(classes)), 2.6 * len(attacks)), sharex=True,
                             squeeze=False)
    width = 0.8 / len(models)
    x = np.arange(len(classes))
    colors = plt.get_cmap("tab10")
    for ax, attack in zip(axes[:, 0], attacks, strict=True):
        for i, m in enumerate(models):
            if attack not in m.per_class:
                continue
            ax.bar(x + (i - (len(models) - 1) / 2) * width, m.per_class[attack], width, label=m.name, color=colors(i))
            avg = m.summary.get(f"{attack}_avg")
            if avg is not None:
                ax.axhline(avg, color=colors(i), linestyle="--", linewidth=1)
        # transfer is a ratio and may exceed 1 (a class the student knows better than its teacher)
        top = max([1.0] + [v for m in models for v in m.per_class.get(attack, []) if v == v])
        ax.set_ylim(0, top)
        ax.set_ylabel("ratio" if attack == "transfer" else "accuracy")
        images = models[0].summary.get(f"{attack}_images")
        ax.set_title(f"{ATTACK_LABELS[attack]}" + (f" ({images} images)" if images else ""), fontsize=10, loc="left")
        ax.grid(axis="y", alpha=0.3)
    axes[0, 0].legend(loc="upper right", ncols=len(models), fontsize=8)
    axes[-1, 0].set_xticks(x, classes, rotation=30, ha="right")
    eps = models[0].summary.get("eps")
    fig.suptitle(f"Per-class accuracy at eps = {eps:g} (dashed: average)" if eps else "Per-class accuracy")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)


def summary_markdown(models: list[ModelMetrics]) -> str:
    """A metrics table (average / worst class / NSD per attack) and the per-class table."""
    attacks = [a for a in ATTACK_LABELS if any(f"{a}_avg" in m.summary for m in models)]
    lines = ["# ferd evaluation summary", ""]
    eps = models[0].summary.get("eps")
    if eps is not None:
        aa = models[0].summary.get("autoattack_version", "off")
        lines += [f"L∞ ε = {eps:g}; AutoAttack version: `{aa}`; last-epoch models, no test-set selection.", ""]
    lines += ["| model | metric | " + " | ".join(ATTACK_LABELS[a] for a in attacks) + " |",
              "|---|---|" + "---:|" * len(attacks)]
    for m in models:
        for key, title in (("avg", "average"), ("worst", "worst class"), ("worst10", "worst 10%"), ("nsd", "NSD")):
            values = [m.summary.get(f"{a}_{key}") for a in attacks]
            if all(v is None for v in values):
                continue
            cells = ["–" if v is None else f"{v:.3f}" for v in values]  # None: undefined (NSD at zero mean)
            lines.append(f"| {m.name} | {title} | " + " | ".join(cells) + " |")
    lines += ["", "## Per class", ""]
    header = ["class"] + [f"{m.name} {ATTACK_LABELS[a]}" for m in models for a in attacks if a in m.per_class]
    lines += ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    for c, cname in enumerate(models[0].classes):
        cells = [f"{m.per_class[a][c]:.3f}" for m in models for a in attacks if a in m.per_class]
        lines.append(f"| {cname} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(metrics_dir: str | Path, out_dir: str | Path, pool: str | Path | None = None) -> list[Path]:
    """Write ``per_class.png`` and ``summary.md`` into ``out_dir``; with the synthesis log, the
    class-weight trajectory (``class_weights.png``); with the pool, a grid of FAEs (``fae_samples.png``).
    Returns the written paths."""
    from ferd.artifacts import load_h5

    models = load_metrics(metrics_dir)
    out = Path(out_dir)
    figure, summary = out / "per_class.png", out / "summary.md"
    per_class_figure(models, figure)
    write_bytes_atomic(summary, summary_markdown(models).encode())
    written = [figure, summary]
    synthesis_log = Path(metrics_dir) / "synthesis.csv"
    if synthesis_log.is_file():
        rows = load_csv(synthesis_log)
        if rows:
            class_weight_figure(rows, models[0].classes, out / "class_weights.png")
            written.append(out / "class_weights.png")
    if pool is not None and Path(pool).is_file():
        arrays, attrs = load_h5(pool, kind="pool", required=("x", "y"))
        fae_grid_figure(arrays["x"], arrays["y"], list(attrs["class_names"]), out / "fae_samples.png")
        written.append(out / "fae_samples.png")
    return written


def fae_grid_figure(pool_x: Any, pool_y: Any, class_names: list[str], path: str | Path, per_class: int = 8) -> None:
    """A grid of pool images: one row per class (the first ``per_class`` of each), for a look at the FAEs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(len(class_names), per_class, figsize=(per_class * 0.9, len(class_names) * 0.95),
                             squeeze=False)
    for c, name in enumerate(class_names):
        idx = np.flatnonzero(np.asarray(pool_y) == c)[:per_class]
        for j in range(per_class):
            ax = axes[c, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j < len(idx):
                img = np.asarray(pool_x[idx[j]]).transpose(1, 2, 0)
                ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img, cmap="gray", vmin=0, vmax=1)
            else:
                ax.axis("off")
        axes[c, 0].set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.suptitle("Fairness-aware examples in the pool (one row per sampled label)", fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90, metadata={"Software": None})
    plt.close(fig)


def class_weight_figure(rows: list[dict[str, str]], class_names: list[str], path: str | Path) -> None:
    """The class proportions p each synthesis epoch sampled from (``metrics/synthesis.csv``)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [int(float(r["epoch"])) for r in rows]
    fig, ax = plt.subplots(figsize=(8, 4))
    for name in class_names:
        ax.plot(epochs, [float(r[f"p_{name}"]) for r in rows], marker="o", markersize=3, label=name)
    ax.set_xlabel("synthesis epoch")
    ax.set_ylabel("class proportion p")
    ax.set_title("Class proportions per synthesis epoch (reweighting)", fontsize=10, loc="left")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncols=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, metadata={"Software": None})
    plt.close(fig)
