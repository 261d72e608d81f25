"""``ferd probe``: per-class fragility D of the teacher on a synthetic probe set (params: seed, data, fae, probe)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from stages._ui import RichProgress, console, handles_errors, load_stage_params, load_teacher, print_config, setup_torch, timed

SECTIONS = ("seed", "data", "fae", "probe")


@handles_errors
def command(
    ctx: typer.Context,
    teacher: Annotated[Path, typer.Option(help="Teacher model.")] = Path("data/teacher/teacher.safetensors"),
    out: Annotated[Path, typer.Option(help="Probe results (HDF5).")] = Path("data/probe/probe.h5"),
) -> None:
    """Synthesise a class-balanced probe set, attack the frozen teacher (PGD), record margins and fragility D."""
    from ferd.artifacts import save_h5
    from ferd.probe import run_probe

    params = load_stage_params(ctx, SECTIONS)
    device = setup_torch(params, "probe")
    print_config("probe", params, SECTIONS, device)
    model, _meta, info = load_teacher(params, teacher, device)
    with timed("probe"), RichProgress() as progress:
        arrays, attrs = run_probe(model, params, info, device=device, progress=progress)
    save_h5(out, kind="probe", arrays=arrays, attrs=attrs)
    table = Table(title="teacher fragility D per class (larger = less robust)", title_justify="left", show_edge=False)
    table.add_column("class", style="cyan")
    table.add_column("D synthetic", justify="right")
    table.add_column("PGD acc synthetic", justify="right")
    has_real = "real_D" in arrays
    if has_real:
        table.add_column(f"D real ({params.probe.real_split})", justify="right")
        table.add_column("PGD acc real", justify="right")
    for c, name in enumerate(info.class_names):
        cells = [f"{arrays['D'][c]:.3f}", f"{arrays['per_class_adv_acc'][c]:.3f}"]
        if has_real:
            cells += [f"{arrays['real_D'][c]:.3f}", f"{arrays['real_per_class_adv_acc'][c]:.3f}"]
        table.add_row(name, *cells)
    console.print(table)
    console.print(f"teacher agrees with the sampled label on {attrs['agreement']:.1%} of the probe set")
    if has_real:
        console.print(f"rank correlation of synthetic and real fragility (Spearman): {attrs['rank_correlation']:.3f}")
    console.print(f"wrote {out}")
