"""``ferd preset NAME``: write params.yaml from a ready-made setting in configs/ (the paper's settings)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages._ui import console, global_options, handles_errors


@handles_errors
def command(
    ctx: typer.Context,
    name: Annotated[str, typer.Argument(help="Preset name (a file configs/NAME.yaml); --list shows them.")] = "",
    list_presets: Annotated[bool, typer.Option("--list", help="List the presets and exit.")] = False,
    configs: Annotated[Path, typer.Option(help="Folder of the presets.")] = Path("configs"),
) -> None:
    """Merge configs/NAME.yaml over params.yaml, validate it, and write params.yaml (then run `dvc repro`)."""
    from ferd.artifacts import write_bytes_atomic
    from ferd.errors import ConfigError
    from ferd.presets import list_presets as names
    from ferd.presets import merged_params, render

    if list_presets:
        for preset in names(configs):
            typer.echo(preset)
        return
    if not name:
        raise ConfigError(f"ferd preset: name a preset; choose one of: {', '.join(names(configs))}")
    params_path = global_options(ctx).params
    merged = merged_params(name, params_path, configs)
    write_bytes_atomic(params_path, render(merged, name).encode())
    console.print(f"wrote {params_path} from configs/{name}.yaml; run `dvc repro` (or `make run`)")
