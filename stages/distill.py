"""``ferd distill``: robust distillation of the student with UTAEs (params: seed, data, fae, probe, reweight, utae, distill).

``fae`` gives the epoch count E and the warm-up; ``probe``/``reweight`` drive the synthesis that
the ``interleaved`` schedule continues here; ``utae`` shapes the on-the-fly UTAEs.
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
    load_pool,
    load_stage_params,
    load_teacher,
    print_config,
    rank0_writes,
    resume_from,
    setup_torch,
    stage_run_state,
    timed,
)

SECTIONS = ("seed", "data", "fae", "probe", "reweight", "utae", "distill")


@handles_errors
def command(
    ctx: typer.Context,
    teacher: Annotated[Path, typer.Option(help="Teacher model.")] = Path("data/teacher/teacher.safetensors"),
    pool: Annotated[Path, typer.Option(help="FAE pool from `ferd synth-fae`.")] = Path("data/fae/pool.h5"),
    utae: Annotated[Path, typer.Option(help="UTAE perturbations from `ferd gen-utae`.")] = Path("data/utae/utae.h5"),
    out: Annotated[Path, typer.Option(help="The student model.")] = Path("data/student/student.safetensors"),
    log: Annotated[Path, typer.Option(help="Per-epoch distillation log (CSV).")] = Path("metrics/distill.csv"),
    probe: Annotated[Path, typer.Option(help="Probe results: the synthetic holdout (and real-image diagnostics).")] = Path(
        "data/probe/probe.h5"),
) -> None:
    """Train the student on the pool with KL (or IKL) on FAEs and their UTAEs, crafted against the live student."""
    import torch

    from ferd.artifacts import load_h5, model_meta, save_csv, save_model
    from ferd.config import as_dict
    from ferd.distill import LOG_COLUMNS, run_distill
    from ferd.errors import ArtifactError

    params = load_stage_params(ctx, SECTIONS)
    batches = {"distill.batch_size": params.distill.batch_size}
    if params.distill.schedule == "interleaved":  # distill synthesises too
        batches["fae.batch_size"] = params.fae.batch_size
    if launch_ranks(ctx, params, "distill", batches=batches):
        return
    device = setup_torch(params, "distill")
    print_config("distill", params, SECTIONS, device)
    model, _meta, info = load_teacher(params, teacher, device)
    arrays, attrs = load_pool(pool, info, required=("x", "y", "epoch", "p_history", "p_next"))
    if attrs.get("schedule") != params.distill.schedule:
        raise ArtifactError(f"{pool}: made for the {attrs.get('schedule')} schedule, distill.schedule is "
                            f"{params.distill.schedule}; rerun `ferd synth-fae`")
    delta = None
    if params.distill.utae_init == "cached":
        utae_arrays, _ = load_h5(utae, kind="utae", required=("delta",), produced_by="gen-utae")
        delta = torch.as_tensor(utae_arrays["delta"])
    from ferd.synthesis import probe_data

    probe_arrays, _ = load_h5(probe, kind="probe", required=("x", "clean_pred"), produced_by="probe")
    data = probe_data(probe_arrays, params.data, params.probe, params.seed,
                      real_images=params.distill.schedule == "interleaved" and params.reweight.signal == "student")
    inputs = [teacher, pool, probe, *([utae] if delta is not None else [])]
    run_state = stage_run_state(params, "distill", SECTIONS, inputs)
    save_state = checkpointer(run_state, params.runtime.checkpoint_every, lambda st: st["distill"]["epoch"])
    with timed("distill"), RichProgress() as progress:
        student, rows = run_distill(model, arrays, params, info, cached_delta=delta, device=device, probe_data=data,
                                    resume=resume_from(run_state, "distill", lambda st: st["distill"]["epoch"]),
                                    save_state=save_state, progress=progress)
    if not rank0_writes():
        return
    d = params.distill
    meta = model_meta(arch=d.arch, num_classes=info.num_classes, input_shape=info.image_shape,
                      mean=[0.0] * info.image_shape[0], std=[1.0] * info.image_shape[0], dataset=info.name,
                      source="distill", width=d.width, class_names=list(info.class_names), seed=params.seed,
                      distill_params=as_dict(d), utae_params=as_dict(params.utae), log=rows)
    save_model(out, student.state_dict(), meta)
    save_csv(log, rows, [*LOG_COLUMNS, *[f"p_{n}" for n in info.class_names]])
    if rows:
        last = rows[-1]
        console.print(f"last epoch {last['epoch']}: loss {last['loss']:.4f}; held-out synthetic images: clean "
                      f"{last['holdout_clean_acc']:.3f}, PGD {last['holdout_pgd_acc']:.3f} (labels = teacher's)")
    if run_state is not None:
        run_state.clear()
    console.print(f"wrote {out} and {log}")
