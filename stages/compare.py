"""``ferd compare``: run the variants × seeds as DVC experiments and tabulate mean ± std over seeds.

``ferd compare --run`` plans one ``dvc exp run -n <variant>-s<seed> -S ...`` per pair (the
comparison setting, the variant's switches, the seed), runs them one after the other in the
workspace (finished ones are skipped, so a stopped comparison continues), then writes the table.
``--jobs N`` (N > 1, implies ``--run``) queues them instead (``dvc exp run --queue``) and runs N at
a time with ``dvc queue start -j N``, waiting for all of them before the table.
``ferd compare`` alone only reads ``dvc exp show --json`` and writes the table; ``--dry-run``
prints the commands. ``ferd compare --list`` shows the variants and their switches.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from stages._ui import console, handles_errors

DEFAULT_SETTING = Path("configs/compare.yaml")


def _ints(text: str) -> list[int]:
    from ferd.errors import ConfigError

    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConfigError(f"--seeds: expected comma-separated integers such as 0,1,2, got {text!r}") from None


@handles_errors
def command(
    run: Annotated[bool, typer.Option("--run", help="Run the missing experiments first (takes long).")] = False,
    jobs: Annotated[int | None, typer.Option("--jobs", "-j", min=1, help="Run the missing experiments N at a time in "
                                             "DVC's experiment queue (implies --run); 1 = one after the other in the "
                                             "workspace.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the dvc exp run commands; run nothing.")] = False,
    list_variants: Annotated[bool, typer.Option("--list", help="List the variants and their switches.")] = False,
    variants: Annotated[str, typer.Option(help="Comma-separated variants [default: all].")] = "",
    seeds: Annotated[str, typer.Option(help="Comma-separated seeds.")] = "0,1,2",
    setting: Annotated[Path, typer.Option(help="YAML of params overrides shared by every experiment (the budget).")]
        = DEFAULT_SETTING,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Extra KEY=VALUE override for every experiment "
                                                    "(wins over the setting and the variant); repeatable.")] = None,
    poll: Annotated[float, typer.Option(help="Seconds between looks at the queue (with --jobs N > 1).", min=0.1)]
        = 15.0,
    out: Annotated[Path, typer.Option(help="Folder for compare.md and compare_worst_class.png.")] = Path("reports"),
    dvc: Annotated[str, typer.Option(help="The dvc executable.")] = "dvc",
    baseline: Annotated[str, typer.Option(help="The variant every other one is paired against, seed by seed.")]
        = "plain",
) -> None:
    """Compare FERD, its ablations and the baselines over seeds: dvc experiments → table, markdown, PNG."""
    from ferd.artifacts import write_bytes_atomic
    from ferd.compare import (
        COLUMNS,
        column_label,
        exp_show_settled,
        experiment_name,
        fmt,
        images_note,
        load_setting,
        markdown_table,
        missing_keys,
        paired,
        paired_cells,
        paired_header,
        paired_markdown,
        plan,
        records_from_exp_show,
        run_experiments,
        run_queued,
        summarise,
        worst_class_chart,
    )
    from ferd.config import parse_set_options
    from ferd.errors import FerdError
    from ferd.variants import VARIANTS, variant

    if list_variants:
        _print_variants()
        return
    names = [v.strip() for v in variants.split(",") if v.strip()] or list(VARIANTS)
    for name in names:
        variant(name)  # a clear error for an unknown name
    variant(baseline)
    experiments = plan(names, _ints(seeds), load_setting(setting), parse_set_options(set_ or []))
    queue = jobs is not None and jobs > 1
    if dry_run:
        for exp in experiments:
            typer.echo(" ".join(exp.command(dvc)[:3] + ["--queue"] * queue + exp.command(dvc)[3:]))
        if queue:
            typer.echo(f"{dvc} queue start -j {jobs}")
        return
    import shutil

    if shutil.which(dvc) is None:  # else a FileNotFoundError traceback from the first subprocess
        raise FerdError(f"compare: the dvc executable {dvc!r} is not found; run `make setup` and put .venv/bin on "
                        "PATH (make compare does), or pass --dvc PATH")
    if queue or run or jobs is not None:
        missing = missing_keys(Path("params.yaml"), experiments)
        if missing:
            raise FerdError(f"compare: params.yaml has no {', '.join(missing)}; `dvc exp run -S` only changes keys "
                            "that exist, so add them (this version's params.yaml lists every key)")
    if queue:
        run_queued(experiments, jobs=jobs, dvc=dvc, echo=console.print, poll_seconds=poll)
    elif run or jobs is not None:
        run_experiments(experiments, dvc=dvc, echo=console.print)

    import time

    # asked again while a queue worker (this run's last, or another's) removes a temporary copy
    records, problems = records_from_exp_show(exp_show_settled(dvc, Path("."), poll, time.sleep))
    for problem in problems:
        console.print(f"[yellow]warning:[/] experiment {problem} is left out of the table")
    wanted = {e.name for e in experiments}
    # the baseline's runs on the same seeds pair with the variants even when they are not in --variants
    base_names = {experiment_name(baseline, e.overrides["seed"]) for e in experiments}
    with_baseline = [r for r in records if r.name in wanted | base_names]
    records = [r for r in records if r.name in wanted]
    if not records:
        raise FerdError("compare: no finished comparison experiments on this commit; run `ferd compare --run` "
                        "(or `make compare`) first")
    rows = summarise(records)
    table = Table(title="student: mean ± std over seeds (accuracy; NSD lower is better)", title_justify="left")
    table.add_column("variant")
    table.add_column("seeds", justify="right")
    for col in COLUMNS:
        table.add_column(column_label(col), justify="right")
    for row in rows:
        table.add_row(row.variant, str(len(row.seeds)), *[fmt(*row.stats[c]) for c in COLUMNS])
    # eleven columns never fit 80: rich's print(width=) can only narrow the console, so print the tables through
    # a console at least 180 wide (a log file or a narrow terminal gets whole numbers, not `0.7…`)
    wide = Console(stderr=True, highlight=False, width=max(console.width, 180))
    wide.print(table)
    note = images_note(records)
    console.print(note)
    pairs = paired(with_baseline, baseline)
    if pairs:
        against = Table(title=f"against {baseline}, seed by seed: Δ in points, mean ± std (seeds higher / shared)",
                        title_justify="left")
        for head in paired_header(pairs):
            against.add_column(head, justify="left" if head == "variant" else "right")
        for pair in pairs:
            against.add_row(pair.variant, *paired_cells(pair))
        wide.print(against)
    else:
        console.print(f"no paired table: no variant shares a finished seed with {baseline}")
    md = markdown_table(rows) + "\n" + note + "\n" + ("\n" + paired_markdown(pairs) if pairs else "")
    write_bytes_atomic(out / "compare.md", md.encode())
    png = worst_class_chart(rows, out / "compare_worst_class.png")
    console.print(f"wrote {out / 'compare.md'} and {png}")


def _print_variants() -> None:
    from ferd.variants import SWITCHES, VARIANTS

    table = Table(title="variants (each sets every switch; `dvc exp run -n NAME -S key=value ...`)", title_justify="left")
    table.add_column("variant")
    for key in SWITCHES:
        table.add_column(key)
    table.add_column("what it is")
    for v in VARIANTS.values():
        table.add_row(v.name, *[str(v.overrides[k]) for k in SWITCHES], v.description)
    console.print(table)
