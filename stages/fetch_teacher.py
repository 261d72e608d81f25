"""``ferd fetch-teacher``: train or import the robust teacher (params: data, teacher; its seed is teacher.seed)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from stages._ui import (
    RichProgress,
    checkpointer,
    console,
    handles_errors,
    launch_ranks,
    load_stage_params,
    print_config,
    rank0_writes,
    resume_from,
    setup_torch,
    stage_run_state,
    timed,
)

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
    if launch_ranks(ctx, params, "fetch-teacher", batches={"teacher.train.batch_size": params.teacher.train.batch_size},
                    when=params.teacher.source == "train"):  # only training is heavy
        return
    device = setup_torch(params, "fetch-teacher", seed=params.teacher.seed)
    print_config("fetch-teacher", params, SECTIONS, device)
    # only training has epochs worth resuming; the run state is keyed by the data and teacher params
    run_state = stage_run_state(params, "fetch-teacher", SECTIONS, []) if params.teacher.source == "train" else None
    save_state = checkpointer(run_state, params.runtime.checkpoint_every, lambda st: st["epoch"])
    with timed("fetch-teacher"), RichProgress() as progress:
        result = fetch_teacher(params, device=device, work_dir=out.parent,
                               resume=resume_from(run_state, "fetch-teacher", lambda st: st["epoch"]),
                               save_state=save_state, progress=progress)
    if not rank0_writes():
        return
    save_model(out, result.state_dict, result.meta)
    if run_state is not None:
        run_state.clear()
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
