"""``ferd reweight``: initial class proportions p from the fragility D of the configured signal (params: reweight)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from stages._ui import console, handles_errors, load_stage_params, print_config

SECTIONS = ("reweight",)


@handles_errors
def command(
    ctx: typer.Context,
    probe: Annotated[Path, typer.Option(help="Probe results from `ferd probe`.")] = Path("data/probe/probe.h5"),
    out: Annotated[Path, typer.Option(help="Class proportions (JSON).")] = Path("data/reweight/class_weights.json"),
) -> None:
    """Map per-class fragility D to class-sampling proportions p: softmax(D/tau), min-max, or uniform."""
    from ferd.artifacts import load_h5, save_json
    from ferd.reweight import class_proportions, initial_fragility

    params = load_stage_params(ctx, SECTIONS)
    print_config("reweight", params, SECTIONS)
    arrays, attrs = load_h5(probe, kind="probe", required=("D",), produced_by="probe")
    D = initial_fragility(arrays, params.reweight.signal)
    p = class_proportions(D, params.reweight)
    names = list(attrs["class_names"])
    save_json(out, {"classes": names, "D": [round(float(v), 8) for v in D], "p": [round(float(v), 8) for v in p],
                    "method": params.reweight.method, "signal": params.reweight.signal, "tau": params.reweight.tau})
    title = f"initial class proportions ({params.reweight.method} of the {params.reweight.signal} signal)"
    table = Table(title=title, title_justify="left", show_edge=False)
    table.add_column("class", style="cyan")
    table.add_column("D", justify="right")
    table.add_column("p", justify="right")
    for name, d, pc in zip(names, D.tolist(), p.tolist(), strict=True):
        table.add_row(name, f"{d:.3f}", f"{pc:.3f}")
    console.print(table)
    console.print(f"wrote {out}")
