"""The ``ferd`` command: one Typer app whose commands are the pipeline's stages.

torch is imported only inside commands so that ``ferd --help`` answers instantly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages import (
    compare,
    distill,
    evaluate,
    fetch_data,
    fetch_teacher,
    gen_utae,
    info,
    preset,
    probe,
    report,
    reweight,
    synth_fae,
)
from stages._ui import GlobalOptions

app = typer.Typer(
    name="ferd",
    help="FERD: fairness-enhanced data-free robustness distillation, as a DVC pipeline.\n\n"
    "Each pipeline command is one stage of dvc.yaml; `dvc repro` runs them in order and reruns only "
    "what a params change touches. Every stage reads params.yaml (see --params).",
    no_args_is_help=True,
    rich_markup_mode="rich",
    pretty_exceptions_show_locals=False,
    add_completion=False,
)


@app.callback()
def main(
    ctx: typer.Context,
    params: Annotated[
        Path, typer.Option("--params", "-p", help="Params file to read.", rich_help_panel="Global options")
    ] = Path("params.yaml"),
    device: Annotated[
        str | None,
        typer.Option(help="Override runtime.device (auto, cpu, cuda, cuda:N).", rich_help_panel="Global options"),
    ] = None,
    threads: Annotated[
        int | None, typer.Option(help="Override runtime.threads (CPU threads; 0 = torch's default).", min=0,
                                 rich_help_panel="Global options"),
    ] = None,
) -> None:
    ctx.obj = GlobalOptions(params=params, device=device, threads=threads)


STAGES = "Pipeline stages"
TOOLS = "Tools"

#: dvc.yaml stage name -> the module implementing it (its SECTIONS are the params it may read).
STAGE_MODULES = {
    "fetch-data": fetch_data,
    "fetch-teacher": fetch_teacher,
    "probe": probe,
    "reweight": reweight,
    "synth-fae": synth_fae,
    "gen-utae": gen_utae,
    "distill": distill,
    "evaluate": evaluate,
}

for _name, _module in STAGE_MODULES.items():
    app.command(_name, rich_help_panel=STAGES)(_module.command)
app.command("report", rich_help_panel=TOOLS)(report.command)
app.command("info", rich_help_panel=TOOLS)(info.command)
app.command("compare", rich_help_panel=TOOLS)(compare.command)
app.command("preset", rich_help_panel=TOOLS)(preset.command)


if __name__ == "__main__":  # python -m stages.cli (tests; the installed entry point is `ferd`)
    app()
