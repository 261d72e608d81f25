"""``ferd synth-fae``: FERD's generator phase, epoch by epoch, into an append-only pool.

Params: seed, data, fae, probe, reweight, and ``distill.schedule`` (staged: all ``fae.epochs``
epochs here; interleaved: only the ``fae.warmup`` epochs, ``distill`` synthesises the rest).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from stages._ui import (
    RichProgress,
    checkpointer,
    console,
    handles_errors,
    launch_ranks,
    load_stage_params,
    load_teacher,
    print_config,
    rank0_writes,
    resume_from,
    setup_torch,
    stage_run_state,
    timed,
)

SECTIONS = ("seed", "data", "fae", "probe", "reweight", "distill.schedule")
LOG_COLUMNS = ("epoch", "total", "bn", "adv", "oh", "uni", "tv", "l2", "teacher_acc", "robust_channels", "probe_adv_acc",
               "classes_present")


@handles_errors
def command(
    ctx: typer.Context,
    teacher: Annotated[Path, typer.Option(help="Teacher model.")] = Path("data/teacher/teacher.safetensors"),
    weights: Annotated[Path, typer.Option(help="Initial class proportions from `ferd reweight`.")] = Path(
        "data/reweight/class_weights.json"),
    out: Annotated[Path, typer.Option(help="The FAE pool (HDF5).")] = Path("data/fae/pool.h5"),
    log: Annotated[Path, typer.Option(help="Per-epoch synthesis log (CSV, for dvc plots).")] = Path("metrics/synthesis.csv"),
    probe: Annotated[Path, typer.Option(help="Probe results (the teacher's fragility on real images).")] = Path(
        "data/probe/probe.h5"),
) -> None:
    """Synthesise Fairness-Aware Examples: fresh generator per epoch, re-probe and re-weight after each epoch."""
    import torch

    from ferd.artifacts import load_json, save_csv, save_h5
    from ferd.config import as_dict
    from ferd.errors import ArtifactError
    from ferd.synthesis import pool_arrays, synthesis_rows, synthesize_pool

    params = load_stage_params(ctx, SECTIONS)
    if launch_ranks(ctx, params, "synth-fae", batches={"fae.batch_size": params.fae.batch_size}):
        return
    device = setup_torch(params, "synth-fae")
    print_config("synth-fae", params, SECTIONS, device)
    model, _meta, info = load_teacher(params, teacher, device)
    cw = load_json(weights, what="class weights", produced_by="reweight")
    if len(cw.get("p", [])) != info.num_classes:
        raise ArtifactError(f"{weights}: {len(cw.get('p', []))} class proportions for a {info.num_classes}-class teacher; "
                            "rerun `ferd probe` and `ferd reweight`")
    from ferd.artifacts import load_h5
    from ferd.synthesis import probe_data

    probe_arrays, _ = load_h5(probe, kind="probe", required=("x", "clean_pred"), produced_by="probe")
    data = probe_data(probe_arrays, params.data, params.probe, params.seed,
                      real_images=params.reweight.signal == "student")
    epochs = params.fae.epochs if params.distill.schedule == "staged" else params.fae.warmup
    run_state = stage_run_state(params, "synth-fae", SECTIONS, [teacher, weights])
    save_state = checkpointer(run_state, params.runtime.checkpoint_every, lambda st: st["epoch"])
    with timed("synth-fae"), RichProgress() as progress:
        x, y, epoch, state = synthesize_pool(
            model, params.fae, params.probe, params.reweight, epochs=epochs, p0=torch.tensor(cw["p"], dtype=torch.float64),
            num_classes=info.num_classes, image_shape=tuple(info.image_shape), eps=params.data.eps, seed=params.seed,
            device=device, resume=resume_from(run_state, "synth-fae", lambda st: st["epoch"]), save_state=save_state,
            progress=progress,
            precision=params.runtime.precision,
            probe_data=data,
        )
    if not rank0_writes():
        return
    attrs = {"num_classes": info.num_classes, "class_names": list(info.class_names), "seed": params.seed,
             "image_shape": list(info.image_shape), "schedule": params.distill.schedule,
             "params": {"fae": as_dict(params.fae), "probe": as_dict(params.probe), "reweight": as_dict(params.reweight)}}
    save_h5(out, kind="pool", arrays=pool_arrays(x, y, epoch, state), attrs=attrs, chunk_rows=params.fae.batch_size)
    rows = synthesis_rows(state, list(info.class_names))
    for r in rows:
        for c, n in enumerate(info.class_names):
            r[f"agree_{n}"] = r.pop(f"agree_{c}", float("nan"))
    save_csv(log, rows, [*LOG_COLUMNS, "rank_corr", *[f"agree_{n}" for n in info.class_names],
                         *[f"p_{n}" for n in info.class_names]])
    if rows:
        acc = [r["teacher_acc"] for r in rows]
        console.print(f"{len(y)} images over {epochs} epochs; teacher agrees with the sampled label on "
                      f"{sum(acc) / len(acc):.1%} of the kept batches (min {min(acc):.1%}, max {max(acc):.1%})")
        final = ", ".join(f"{n} {v:.3f}" for n, v in zip(info.class_names, state.p.tolist(), strict=True))
        console.print(f"class proportions after the last epoch: {final}")
        corr = [r["rank_corr"] for r in rows if r["rank_corr"] == r["rank_corr"]]  # NaN: no diagnostic that epoch
        if corr:
            console.print(f"rank correlation of the {params.reweight.signal} signal with its real-image diagnostic: "
                          f"mean {sum(corr) / len(corr):+.2f} over {len(corr)} epochs (last {corr[-1]:+.2f})")
    if run_state is not None:
        run_state.clear()
    console.print(f"wrote {out} and {log}")
