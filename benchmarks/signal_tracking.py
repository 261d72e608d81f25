"""Where the reweighting signal's rank correlation with real robustness is lost: a synth-fae run, measured.

`metrics/synthesis.csv`'s `rank_corr` compares, each epoch, the D in use with a real-image
diagnostic (for the `student` signal: the shadow student's fragility on `probe.real_per_class`
real training images per class). A low value can come from three places; this script measures
each on one synthesis run (the `synth-fae` stage's loop with params.yaml's settings, writing no
artifact):

- the diagnostic's own noise: the same student's fragility on `--big-per-class` other real images
  per class, ranked against the diagnostic;
- the signal's noise across epochs: a running average of D (`reweight.momentum`) recomputed from
  the measured D of every epoch;
- a holdout too small: rerun with a larger `probe.per_class` (`ferd probe` first) and compare.

The recorder wraps ``Synthesizer.signal`` and returns what it returns, so the run is the stage's
run (p, pool and shadow student evolve as in `ferd synth-fae`; the momentum rows are an offline
recomputation on that trajectory, not separate runs). Needs a ``student`` signal (the diagnostic
ranks the student) and ``probe.real_split`` set.

    python benchmarks/signal_tracking.py [--params params.yaml] [--big-per-class 500] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import torch

from ferd.probe import rank_correlation


def smoothed(measured: list[list[float]], present: list[list[bool]], momentum: float) -> list[torch.Tensor]:
    """The D in use after each epoch, as the stage computes it: classes absent from the measurement keep
    their previous value (``fill_absent``), then the running average (``smooth_fragility``)."""
    from ferd.reweight import fill_absent, smooth_fragility

    out: list[torch.Tensor] = []
    for d, p in zip(measured, present, strict=True):
        prev = out[-1] if out else None
        out.append(smooth_fragility(prev, fill_absent(torch.tensor(d, dtype=torch.float64), torch.tensor(p), prev),
                                    momentum))
    return out


def top_overlap(a: torch.Tensor | list[float], b: torch.Tensor | list[float], k: int) -> int:
    """How many of a's k most fragile classes are among b's k most fragile."""
    ta = set(torch.as_tensor(a).argsort(descending=True)[:k].tolist())
    tb = set(torch.as_tensor(b).argsort(descending=True)[:k].tolist())
    return len(ta & tb)


def tracking_table(records: list[dict[str, Any]], momenta: list[float], k: int = 3) -> list[dict[str, Any]]:
    """One row per (reference, momentum): the per-epoch Spearman correlations, their mean and the mean
    top-k overlap. ``records``: per epoch ``D`` (measured), ``present`` (its measured classes),
    ``diag`` (the run's diagnostic), ``big`` (the larger diagnostic). The first row ranks the two
    diagnostics against each other."""
    recs = [r for r in records if r.get("diag") is not None and r.get("big") is not None]
    if not recs:
        raise ValueError("no epoch with both diagnostics: use reweight.signal student and probe.real_split train")
    rows = [{"what": "diagnostic vs larger diagnostic", "momentum": None,
             "corr": [rank_correlation(r["diag"], r["big"]) for r in recs],
             "top": [top_overlap(r["diag"], r["big"], k) for r in recs]}]
    for m in momenta:
        ds = smoothed([r["D"] for r in recs], [r["present"] for r in recs], m)
        for ref in ("diag", "big"):
            rows.append({"what": f"signal vs {'diagnostic' if ref == 'diag' else 'larger diagnostic'}",
                         "momentum": m, "corr": [rank_correlation(d, r[ref]) for d, r in zip(ds, recs, strict=True)],
                         "top": [top_overlap(d, r[ref], k) for d, r in zip(ds, recs, strict=True)]})
    for row in rows:
        row["mean"] = sum(row["corr"]) / len(row["corr"])
        row["top_mean"] = sum(row["top"]) / len(row["top"])
    return rows


def record_run(params_path: str, teacher: str, probe: str, weights: str, big_per_class: int,
               threads: int = 1) -> list[dict[str, Any]]:
    """Run the synthesis loop as `ferd synth-fae` does and record, each epoch, the measured D, the
    run's diagnostic and the same student's fragility on ``big_per_class`` other real images."""
    import ferd.synthesis as synthesis
    from ferd.artifacts import load_h5, load_json, load_model
    from ferd.config import load_params
    from ferd.data import class_balanced_subset, dataset_info, load_split
    from ferd.errors import ConfigError
    from ferd.runtime import configure_torch

    params = load_params(params_path)
    if params.reweight.signal != "student" or params.probe.real_split == "none" or params.distill.schedule != "staged":
        raise ConfigError("signal_tracking: needs reweight.signal: student, probe.real_split: train and "
                          "distill.schedule: staged (it measures synth-fae's shadow student)")
    info = dataset_info(params.data)
    model, _meta = load_model(teacher)
    arrays, _ = load_h5(probe, kind="probe", required=("x", "clean_pred"), produced_by="probe")
    data = synthesis.probe_data(arrays, params.data, params.probe, params.seed, real_images=True)
    # other real images than the diagnostic's (its subset is drawn with params.seed)
    big = class_balanced_subset(load_split(params.data, params.probe.real_split), big_per_class, seed=params.seed + 1)
    big_x, big_y = big.images(), big.y
    records: list[dict[str, Any]] = []
    measure = synthesis.Synthesizer.signal

    def recording_signal(self, epoch, result, y, student):  # the stage's signal, recorded, returned unchanged
        D, present, diag = measure(self, epoch, result, y, student)
        rec = {"epoch": epoch, "D": D.tolist(), "present": present.tolist(),
               "diag": diag.tolist() if diag is not None else None, "big": None}
        if student is not None:
            rec["big"] = self._attack(student, big_x, big_y, f"signal-tracking/big-{epoch}").D.tolist()
        records.append(rec)
        return D, present, diag

    synthesis.Synthesizer.signal = recording_signal
    configure_torch(threads, params.seed, "synth-fae")  # the stage's global seed: the same run
    try:
        cw = load_json(weights, what="class weights", produced_by="reweight")
        synthesis.synthesize_pool(
            model, params.fae, params.probe, params.reweight, epochs=params.fae.epochs,
            p0=torch.tensor(cw["p"], dtype=torch.float64), num_classes=info.num_classes,
            image_shape=tuple(info.image_shape), eps=params.data.eps, seed=params.seed,
            device=torch.device("cpu"), probe_data=data,
        )
    finally:
        synthesis.Synthesizer.signal = measure
    return records


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--teacher", default="data/teacher/teacher.safetensors")
    parser.add_argument("--probe", default="data/probe/probe.h5")
    parser.add_argument("--weights", default="data/reweight/class_weights.json")
    parser.add_argument("--big-per-class", type=int, default=500, help="real images per class of the larger diagnostic")
    parser.add_argument("--momenta", default="0,0.3,0.5,0.7", help="running averages of D to recompute")
    parser.add_argument("--records", help="analyse a --json file of an earlier run instead of running")
    parser.add_argument("--json", help="also write the per-epoch records here")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    from ferd.errors import FerdError

    try:
        if args.records:
            records = json.loads(Path(args.records).read_text())
        else:
            records = record_run(args.params, args.teacher, args.probe, args.weights, args.big_per_class, args.threads)
    except FerdError as err:  # bad params or artifacts: one line, non-zero exit
        raise SystemExit(f"error: {err}") from None
    if args.json:
        Path(args.json).write_text(json.dumps(records))
    rows = tracking_table(records, [float(m) for m in args.momenta.split(",")])
    print(f"Spearman rank correlation per epoch ({len(rows[0]['corr'])} epochs); top-3: shared most fragile classes")
    for r in rows:
        m = "" if r["momentum"] is None else f"momentum {r['momentum']:.1f}"
        print(f"{r['what']:36s} {m:13s} mean {r['mean']:+.3f}  top-3 {r['top_mean']:.1f}  "
              + " ".join(f"{c:+.2f}" for c in r["corr"]))


if __name__ == "__main__":
    main()
