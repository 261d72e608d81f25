"""``ferd fetch-teacher``: train or import the robust teacher (params: data, teacher; its seed is teacher.seed)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from stages._ui import RichProgress, console, handles_errors, load_stage_params, print_config, setup_torch, timed

SECTIONS = ("data", "teacher")


@handles_errors
def command(
    ctx: typer.Context,
    out: Annotated[Path, typer.Option(help="Where to write the teacher model.")] = Path("data/teacher/teacher.safetensors"),
) -> None:
    """Train (PGD-AT) or import (file:, url:, robustbench:) the robust teacher and check it on the test split."""
    from ferd.artifacts import save_model
    from ferd.teacher import fetch_teacher

    params = load_stage_params(ctx, SECTIONS)
    device = setup_torch(params, "fetch-teacher", seed=params.teacher.seed)
    print_config("fetch-teacher", params, SECTIONS, device)
    with timed("fetch-teacher"), RichProgress() as progress:
        result = fetch_teacher(params, device=device, work_dir=out.parent, progress=progress)
    save_model(out, result.state_dict, result.meta)
    check = result.meta["check"]
    table = Table(title=f"teacher on {check['images']} test images (eps {check['eps']:g}, PGD-{check['pgd_steps']})",
                  title_justify="left", show_edge=False)
    table.add_column("class", style="cyan")
    table.add_column("clean", justify="right")
    table.add_column("PGD", justify="right")
    for name, clean, adv in zip(result.meta["class_names"], check["clean_per_class"], check["pgd_per_class"], strict=True):
        table.add_row(name, f"{clean:.3f}", f"{adv:.3f}")
    table.add_row("[bold]all[/]", f"[bold]{check['clean_acc']:.3f}[/]", f"[bold]{check['pgd_acc']:.3f}[/]")
    console.print(table)
    console.print(f"wrote {out}")
