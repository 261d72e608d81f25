"""``ferd info PATH``: what a ferd artifact holds (metadata, tensors/datasets and shapes)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from stages._ui import console, handles_errors


@handles_errors
def command(
    path: Annotated[Path, typer.Argument(help="A model (.safetensors), image set (.h5) or results (.json) file.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print the description as JSON on stdout.")] = False,
) -> None:
    """Print any ferd artifact's metadata and its tensors/datasets with shapes."""
    from ferd.artifacts import describe

    desc = describe(path)
    if as_json:
        print(json.dumps(desc, sort_keys=True, indent=2))
        return
    meta = Table(title=f"{path} ({desc['format']})", title_justify="left", show_edge=False)
    meta.add_column("metadata", style="cyan", no_wrap=True)
    meta.add_column("value")
    for key, value in sorted(desc["meta"].items()):
        text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
        meta.add_row(key, text if len(text) <= 200 else text[:197] + "...")
    console.print(meta)
    if desc["entries"]:
        entries = Table(show_edge=False)
        entries.add_column("tensor / dataset", style="cyan")
        entries.add_column("dtype")
        entries.add_column("shape")
        for name, e in desc["entries"].items():
            entries.add_row(name, e["dtype"], "×".join(map(str, e["shape"])) or "scalar")
        console.print(entries)
