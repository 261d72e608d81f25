"""``ferd report``: PNG figures and a markdown summary from the evaluate metrics."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages._ui import console, handles_errors


@handles_errors
def command(
    metrics_dir: Annotated[Path, typer.Option(help="Where `ferd evaluate` wrote its metrics.")] = Path("metrics"),
    out: Annotated[Path, typer.Option(help="Folder for the figures and summary.md.")] = Path("reports"),
    pool: Annotated[Path, typer.Option(help="FAE pool for the sample grid (skipped when absent).")] = Path(
        "data/fae/pool.h5"),
) -> None:
    """Write per-class accuracy figures (teacher vs student), the class-weight trajectory, an FAE grid, a summary."""
    from ferd.report import write_report

    for path in write_report(metrics_dir, out, pool):
        console.print(f"wrote {path}")
