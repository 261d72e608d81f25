"""``ferd evaluate``: clean / FGSM / PGD / CW / AutoAttack accuracy per class (params: data, evaluate; seed: evaluate.seed)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from stages._ui import RichProgress, console, handles_errors, load_stage_params, print_config, setup_torch, timed

SECTIONS = ("data", "evaluate")
COLUMNS = ("clean", "fgsm", "pgd", "cw", "pgd_aa", "autoattack", "transfer")
PRODUCED_BY = {"teacher": "fetch-teacher", "student": "distill"}


@handles_errors
def command(
    ctx: typer.Context,
    name: Annotated[str, typer.Option(help="Which model; names metrics/<name>.json and <name>_per_class.csv.")] = "teacher",
    model: Annotated[Path | None, typer.Option(help="Model artifact [default: data/<name>/<name>.safetensors].")] = None,
    metrics_dir: Annotated[Path, typer.Option(help="Where to write the metrics.")] = Path("metrics"),
    teacher: Annotated[Path | None, typer.Option(
        help="The teacher of a distilled model: also report transfer (model clean / teacher clean, per class).")] = None,
) -> None:
    """Attack a model on the test split; write per-class accuracy and its summary (avg, worst, NSD)."""
    from ferd.artifacts import load_model, require_compatible, save_csv, save_json
    from ferd.data import dataset_info, load_split
    from ferd.evaluate import evaluate_model

    params = load_stage_params(ctx, SECTIONS)
    device = setup_torch(params, f"evaluate-{name}", seed=params.evaluate.seed)
    print_config(f"evaluate ({name})", params, SECTIONS, device)
    path = model or Path("data") / name / f"{name}.safetensors"
    net, meta = load_model(path, device=device, produced_by=PRODUCED_BY.get(name))
    info = dataset_info(params.data)
    require_compatible(meta, path, num_classes=info.num_classes, image_shape=info.image_shape, what=info.name)
    reference = None
    if teacher is not None:
        reference, teacher_meta = load_model(teacher, device=device, produced_by="fetch-teacher")
        require_compatible(teacher_meta, teacher, num_classes=info.num_classes, image_shape=info.image_shape, what=info.name)
    test = load_split(params.data, "test")
    with timed(f"evaluate ({name})"), RichProgress() as progress:
        result = evaluate_model(net, test, params.evaluate, eps=params.data.eps, seed=params.evaluate.seed, progress=progress,
                                reference=reference)
    columns = ["class", "name", *[c for c in COLUMNS if c in result.per_class]]
    save_json(metrics_dir / f"{name}.json", result.flat_metrics())
    save_csv(metrics_dir / f"{name}_per_class.csv", result.per_class_rows(), columns)
    _print_result(name, result)
    console.print(f"wrote {metrics_dir / f'{name}.json'} and {metrics_dir / f'{name}_per_class.csv'}")


def _print_result(name: str, result) -> None:
    attacks = [c for c in COLUMNS if c in result.per_class]
    label = {"clean": "clean", "fgsm": "FGSM", "pgd": "PGD", "cw": "CW∞", "pgd_aa": "PGD (AA images)",
             "autoattack": f"AA ({result.autoattack_version})",
             "transfer": "transfer"}
    table = Table(title=f"{name}: accuracy per class at eps {result.eps:g}", title_justify="left", show_edge=False)
    table.add_column("class", style="cyan")
    for a in attacks:
        table.add_column(label[a], justify="right")
    for c, cname in enumerate(result.class_names):
        table.add_row(cname, *[_fmt(result.per_class[a][c]) for a in attacks])
    table.add_section()
    for key, title in (("avg", "average"), ("worst", "worst class"), ("worst10", "worst 10%"), ("nsd", "NSD")):
        values = [result.summary[a][key] for a in attacks]
        if any(v is not None for v in values):
            table.add_row(f"[bold]{title}[/]", *[_fmt(v) for v in values])
    table.add_row("images", *[str(result.images[a]) for a in attacks])
    console.print(table)
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {warning}")


def _fmt(v: float | None) -> str:
    """A table cell: 3 decimals, '-' where a value is undefined (NSD of a ratio, transfer of a class the teacher misses)."""
    return "-" if v is None or not math.isfinite(v) else f"{v:.3f}"
