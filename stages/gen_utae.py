"""``ferd gen-utae``: the UTAE of every pool image against the teacher (params: seed, data, utae).

The paper's written equation (§2.5): target = teacher(x_F), attacked model = teacher. Writes the
perturbations (``distill.utae_init: cached`` starts from them) and the attacked-class histogram
next to the one plain KL-PGD (γ = 0) gives from the same start: the "uniform target" claim, visible.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from stages._ui import (
    RichProgress,
    console,
    handles_errors,
    load_pool,
    load_stage_params,
    load_teacher,
    print_config,
    setup_torch,
    timed,
)

SECTIONS = ("seed", "data", "utae")


@handles_errors
def command(
    ctx: typer.Context,
    teacher: Annotated[Path, typer.Option(help="Teacher model.")] = Path("data/teacher/teacher.safetensors"),
    pool: Annotated[Path, typer.Option(help="FAE pool from `ferd synth-fae`.")] = Path("data/fae/pool.h5"),
    out: Annotated[Path, typer.Option(help="UTAE perturbations and histograms (HDF5).")] = Path("data/utae/utae.h5"),
    hist: Annotated[Path, typer.Option(help="Attack-target histograms (CSV, for dvc plots).")] = Path(
        "metrics/utae_targets.csv"),
    batch_size: Annotated[int, typer.Option(min=1, help="Images per attack batch (speed only).")] = 256,
) -> None:
    """Craft the uniform-target adversarial example of every pool image against the teacher."""
    import torch

    from ferd.artifacts import save_csv, save_h5
    from ferd.config import as_dict
    from ferd.errors import ArtifactError
    from ferd.runtime import torch_generator
    from ferd.utae import generate_utae_set

    params = load_stage_params(ctx, SECTIONS)
    device = setup_torch(params, "gen-utae")
    print_config("gen-utae", params, SECTIONS, device)
    model, _meta, info = load_teacher(params, teacher, device)
    arrays, _attrs = load_pool(pool, info, required=("x", "y", "epoch"))
    x = torch.as_tensor(arrays["x"])
    if len(x) == 0:
        raise ArtifactError(f"{pool}: the pool is empty (interleaved schedule with fae.warmup 0?); nothing to attack")
    with timed("gen-utae"), RichProgress() as progress:
        result = generate_utae_set(model, x, cfg=params.utae, eps=params.data.eps, batch_size=batch_size,
                                   generator=torch_generator(params.seed, "gen-utae"), progress=progress)
    save_h5(out, kind="utae", arrays={
        "delta": result.delta.numpy(), "hist": result.hist.numpy(), "hist_plain": result.hist_plain.numpy(),
        "clean_pred": result.clean_pred.numpy(), "adv_pred": result.pred_adv.numpy(),
        "adv_pred_plain": result.pred_adv_plain.numpy(),
    }, attrs={"num_classes": info.num_classes, "class_names": list(info.class_names), "seed": params.seed,
              "eps": params.data.eps, "gamma": params.utae.gamma, "success": result.success,
              "success_plain": result.success_plain, "entropy": result.entropy, "entropy_plain": result.entropy_plain,
              "params": {"utae": as_dict(params.utae)}}, chunk_rows=256)
    rows = [{"class": c, "name": n, "utae": int(result.hist[c]), "plain": int(result.hist_plain[c])}
            for c, n in enumerate(info.class_names)]
    save_csv(hist, rows, ["class", "name", "utae", "plain"])
    table = Table(title="classes the attacks moved pool images to", title_justify="left", show_edge=False)
    table.add_column("class", style="cyan")
    table.add_column(f"UTAE (gamma {params.utae.gamma:g})", justify="right")
    table.add_column("KL-PGD (gamma 0)", justify="right")
    for r in rows:
        table.add_row(r["name"], str(r["utae"]), str(r["plain"]))
    table.add_row("[bold]entropy (nats)[/]", f"{abs(result.entropy):.3f}", f"{abs(result.entropy_plain):.3f}")
    table.add_row("[bold]success rate[/]", f"{result.success:.1%}", f"{result.success_plain:.1%}")
    console.print(table)
    console.print(f"wrote {out} and {hist}")
