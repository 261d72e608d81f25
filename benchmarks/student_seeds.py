"""How much of a result is the seed? One setting, several seeds, the spread of every class's transfer.

At the Fashion-MNIST CPU scale the lowest per-class transfer of the default student (student clean /
teacher clean for the class; the issue's goal: every class >= 0.6) moves 0.34-0.69 between seeds,
more than any lever measured moves its mean (docs/results.md, "The student's seed on one pool"). A
claim about it therefore needs several seeds, and this script runs them:

- ``--from distill`` (default): the seeds share one pool, probe and teacher (the committed ``make run``
  artifacts unless told otherwise); each seed reruns ``ferd distill`` and ``ferd evaluate``, so only the
  student's initialisation, batch order and attack noise change.
- ``--from probe``: each seed runs the chain from ``ferd probe`` (its own probe set, class weights and
  pool) on the shared teacher, as ``dvc exp run -S seed=N`` would, without touching the workspace.

Every seed writes into ``OUT/seed-N/`` (its params.yaml: the base params + ``--set`` overrides +
``seed: N``, validated before anything runs; stage logs; the student and its metrics); ``--summary``
tabulates finished directories again without running anything. AutoAttack is off unless
``--autoattack`` names a version: the table is about clean accuracy, transfer and PGD-20 on the test
split (``evaluate.per_class``). The test split only reports; nothing is selected on it.

    python benchmarks/student_seeds.py --seeds 0,1,2,3 --out runs/seeds/default
    python benchmarks/student_seeds.py --seeds 0,1 --out runs/seeds/steps160 --set distill.steps=160 --jobs 2
    python benchmarks/student_seeds.py --summary runs/seeds/default runs/seeds/steps160
    python benchmarks/student_seeds.py --summary runs/seeds/default --by-margin

``--by-margin`` asks where the students lose a class: among the test images the teacher gets right,
binned by the teacher's margin p_y - max_{k != y} p_k, the share each student also gets right (mean ±
std over the seeds), per class. It separates two causes of a low transfer: a class whose teacher
decisions are mostly low-margin (a student loses those in every class) and a class the students
lose even where the teacher is sure. ``expected from the margin mix`` is the share the class would keep
if each of its bins were kept at the all-class rate.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from anywhere: ferd and stages are importable

from ferd.config import apply_overrides, params_from_mapping, parse_set_options, read_params_mapping  # noqa: E402
from ferd.errors import ConfigError, FerdError  # noqa: E402, F401  (ConfigError: what bad --set values raise)


class Inputs(NamedTuple):
    """The shared artifacts (``--from probe`` uses only the teacher)."""

    teacher: Path
    pool: Path
    probe: Path
    utae: Path


def seed_params(base: Path, overrides: dict[str, Any], seed: int, autoattack: str) -> dict[str, Any]:
    """The base params with the overrides, ``seed`` and ``evaluate.autoattack`` applied (a nested mapping)."""
    return apply_overrides(read_params_mapping(base), {**overrides, "seed": seed, "evaluate.autoattack": autoattack})


def stage_commands(run: Path, params: Path, inputs: Inputs, start: str, threads: int) -> list[tuple[str, list[str]]]:
    """The ``ferd`` invocations of one seed, in order: (stage, argv after the executable)."""
    ferd = [sys.executable, "-m", "stages.cli", "--params", str(params), "--threads", str(threads)]
    pool, probe, utae = inputs.pool, inputs.probe, inputs.utae
    chain: list[tuple[str, list[str]]] = []
    if start == "probe":
        probe, pool, utae = run / "probe.h5", run / "pool.h5", run / "utae.h5"
        weights = run / "class_weights.json"
        chain += [
            ("probe", ["probe", "--teacher", str(inputs.teacher), "--out", str(probe)]),
            ("reweight", ["reweight", "--probe", str(probe), "--out", str(weights)]),
            ("synth-fae", ["synth-fae", "--teacher", str(inputs.teacher), "--weights", str(weights), "--probe",
                           str(probe), "--out", str(pool), "--log", str(run / "synthesis.csv")]),
            ("gen-utae", ["gen-utae", "--teacher", str(inputs.teacher), "--pool", str(pool), "--out", str(utae),
                          "--hist", str(run / "utae_targets.csv")]),
        ]
    chain += [
        ("distill", ["distill", "--teacher", str(inputs.teacher), "--pool", str(pool), "--utae", str(utae),
                     "--probe", str(probe), "--out", str(run / "student.safetensors"), "--log", str(run / "distill.csv")]),
        ("evaluate", ["evaluate", "--name", "student", "--model", str(run / "student.safetensors"),
                      "--metrics-dir", str(run), "--teacher", str(inputs.teacher)]),
    ]
    return [(stage, ferd + argv) for stage, argv in chain]


def run_seed(run: Path, commands: list[tuple[str, list[str]]]) -> dict[str, float]:
    """Run one seed's stages in order (log: ``run/log.txt``); the seconds each took, also in ``times.json``."""
    times: dict[str, float] = {}
    with open(run / "log.txt", "w") as log:
        for stage, argv in commands:
            start = time.perf_counter()
            done = subprocess.run(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=False)
            times[stage] = round(time.perf_counter() - start, 1)
            if done.returncode != 0:
                raise RuntimeError(f"{run}: `ferd {stage}` failed (exit {done.returncode}); see {run / 'log.txt'}")
    (run / "times.json").write_text(json.dumps(times, indent=1) + "\n")
    return times


def read_run(run: Path) -> dict[str, Any] | None:
    """One finished seed's numbers (None while ``student.json`` is missing)."""
    metrics_path, per_class_path = run / "student.json", run / "student_per_class.csv"
    if not metrics_path.is_file():
        return None
    metrics = json.loads(metrics_path.read_text())
    with open(per_class_path, newline="") as f:
        rows = list(csv.DictReader(f))
    transfer = {r["name"]: float(r["transfer"]) for r in rows}
    if not transfer:
        raise ValueError(f"{per_class_path}: no rows")
    lowest = min(transfer, key=transfer.get)
    params = read_params_mapping(run / "params.yaml") if (run / "params.yaml").is_file() else {}
    return {"run": str(run), "seed": params.get("seed"), "clean": metrics["clean_avg"], "pgd": metrics["pgd_avg"],
            "pgd_worst": metrics["pgd_worst"], "pgd_worst_class": metrics["pgd_worst_class"],
            "images": metrics["clean_images"], "transfer": transfer, "lowest": transfer[lowest], "lowest_class": lowest}


def summarise(records: list[dict[str, Any]], threshold: float) -> dict[str, Any]:
    """Mean and sample std over seeds of each column, every class's mean transfer, how many seeds pass."""

    def stats(values: list[float]) -> dict[str, float]:
        return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values), "max": max(values)}

    classes = list(records[0]["transfer"])
    return {
        "seeds": len(records),
        **{col: stats([r[col] for r in records]) for col in ("clean", "pgd", "pgd_worst", "lowest")},
        "transfer": {c: statistics.fmean(r["transfer"][c] for r in records) for c in classes},
        "passing": sum(r["lowest"] >= threshold for r in records),
        "threshold": threshold,
    }


def table(records: list[dict[str, Any]], threshold: float) -> str:
    """A markdown table: one row per seed, then the mean ± std row and the pass count."""
    lines = ["| seed | clean | PGD-20 | PGD-20 worst | lowest transfer | two lowest classes (transfer) |",
             "|---|---|---|---|---|---|"]
    for r in records:
        two = sorted(r["transfer"], key=r["transfer"].get)[:2]
        lines.append(f"| {r['seed']} | {r['clean']:.3f} | {r['pgd']:.3f} | {r['pgd_worst']:.3f} "
                     f"{r['pgd_worst_class']} | {r['lowest']:.2f} | "
                     + ", ".join(f"{c} {r['transfer'][c]:.2f}" for c in two) + " |")
    s = summarise(records, threshold)
    lines.append(f"| mean ± std ({s['seeds']}) | {s['clean']['mean']:.3f} ± {s['clean']['std']:.3f} | "
                 f"{s['pgd']['mean']:.3f} ± {s['pgd']['std']:.3f} | {s['pgd_worst']['mean']:.3f} ± "
                 f"{s['pgd_worst']['std']:.3f} | {s['lowest']['mean']:.2f} ± {s['lowest']['std']:.2f} | "
                 f"every class >= {threshold:g}: {s['passing']} of {s['seeds']} |")
    return "\n".join(lines)


MARGIN_BINS = (0.0, 0.2, 0.5, 1.0)


def teacher_margin(probs: Any, y: Any) -> Any:
    """p_y - max_{k != y} p_k per image (> 0 exactly where the teacher is right)."""
    import torch

    rows = torch.arange(len(y))
    others = probs.clone()
    others[rows, y] = -1.0
    return probs[rows, y] - others.max(dim=1).values


def margin_table(teacher_probs: Any, student_preds: list[Any], y: Any, names: list[str],
                 bins: tuple[float, ...] = MARGIN_BINS) -> list[dict[str, Any]]:
    """Per class (and ``all``): per margin bin of the teacher's correct images, their count and the share
    each student keeps (mean, std over students); the share kept over all bins (mean over students);
    and the share expected at the all-class keep rate of each bin (what the class's margin mix alone
    would give). The last bin is closed (a margin of exactly 1 counts)."""
    import torch

    margin = teacher_margin(teacher_probs, y)
    right = margin > 0

    def bin_mask(i: int) -> Any:
        upper = margin <= bins[i + 1] if i == len(bins) - 2 else margin < bins[i + 1]
        return right & (margin >= bins[i]) & upper

    def kept(mask: Any) -> list[float]:
        return [float((pred[mask] == y[mask]).float().mean()) for pred in student_preds] if mask.any() else []

    overall = [statistics.fmean(k) if (k := kept(bin_mask(i))) else 0.0 for i in range(len(bins) - 1)]
    table = []
    for c, name in [*enumerate(names), (None, "all")]:
        in_class = (y == c) if c is not None else torch.ones_like(y, dtype=torch.bool)
        cells = []
        for i in range(len(bins) - 1):
            mask = bin_mask(i) & in_class
            k = kept(mask)
            cells.append({"n": int(mask.sum()), "kept": statistics.fmean(k) if k else float("nan"),
                          "std": statistics.stdev(k) if len(k) > 1 else 0.0, "each": k})
        n_right = sum(cell["n"] for cell in cells)
        expected = sum(cell["n"] * rate for cell, rate in zip(cells, overall, strict=True)) / n_right if n_right else float("nan")
        total = kept(right & in_class)
        table.append({"class": name, "bins": cells, "kept": statistics.fmean(total) if total else float("nan"),
                      "expected": expected})
    return table


def by_margin(out_dirs: list[Path], params_path: Path, teacher_path: Path) -> str:
    """``margin_table`` of the finished students under ``out_dirs`` on the full test split, as markdown."""
    import torch

    from ferd.artifacts import load_model
    from ferd.config import load_params
    from ferd.data import load_split

    params = load_params(params_path)
    test = load_split(params.data, "test")
    x, y = test.images(), test.y

    @torch.no_grad()
    def outputs(model: Any) -> Any:
        return torch.cat([model(x[i:i + 1000]) for i in range(0, len(x), 1000)])

    teacher, _ = load_model(teacher_path)
    paths = [p for out in out_dirs for p in sorted(out.glob("seed-*/student.safetensors"))
             if (p.parent / "student.json").is_file()]  # finished runs only
    students = [load_model(p, produced_by="distill")[0] for p in paths]
    if not students:
        raise SystemExit(f"error: no finished students under {', '.join(map(str, out_dirs))}")
    rows = margin_table(outputs(teacher).softmax(dim=1), [outputs(s).argmax(dim=1) for s in students], y,
                        list(test.class_names))
    heads = [f"margin [{lo:g}, {hi:g}{']' if i == len(MARGIN_BINS) - 2 else ')'}: n, kept"
             for i, (lo, hi) in enumerate(zip(MARGIN_BINS[:-1], MARGIN_BINS[1:], strict=True))]
    lines = [f"Test images the teacher gets right, by its margin; kept = share the {len(students)} students get "
             "right too (mean ± std)", "", "| class | " + " | ".join(heads) + " | kept | expected from the margin mix |",
             "|---|" + "---|" * (len(heads) + 2)]
    for row in rows:
        cells = [f"{b['n']}, {b['kept']:.2f} ± {b['std']:.2f}" for b in row["bins"]]
        lines.append(f"| {row['class']} | " + " | ".join(cells) + f" | {row['kept']:.2f} | {row['expected']:.2f} |")
    runs = [p.parent.name if len(out_dirs) == 1 else f"{p.parents[1].name}/{p.parent.name}" for p in paths]
    lines += ["", f"The confident bin (margin >= {MARGIN_BINS[-2]:g}), kept by each student:", "",
              "| class | " + " | ".join(map(str, runs)) + " |", "|---|" + "---|" * len(runs)]
    for row in rows:
        lines.append(f"| {row['class']} | " + " | ".join(f"{k:.2f}" for k in row["bins"][-1]["each"]) + " |")
    return "\n".join(lines)


def show(out_dirs: list[Path], threshold: float) -> None:
    for out in out_dirs:
        runs = sorted((p for p in out.glob("seed-*") if p.is_dir()), key=lambda p: int(p.name.split("-", 1)[1]))
        records = [rec for rec in map(read_run, runs) if rec is not None]
        pending = len(runs) - len(records)
        print(f"\n{out} ({len(records)} finished" + (f", {pending} pending" if pending else "") + ")")
        if records:
            print(table(records, threshold))
            images = sorted({r["images"] for r in records})
            print(f"clean / PGD-20 on {', '.join(map(str, images))} test images per run")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0,1,2,3", help="comma-separated seeds")
    parser.add_argument("--out", type=Path, help="one directory per seed is made under it (must not exist yet)")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="KEY=VALUE override (repeatable)")
    parser.add_argument("--from", dest="start", choices=("distill", "probe"), default="distill",
                        help="distill: share the pool; probe: each seed synthesises its own")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--teacher", type=Path, default=REPO / "data/teacher/teacher.safetensors")
    parser.add_argument("--pool", type=Path, default=REPO / "data/fae/pool.h5")
    parser.add_argument("--probe", type=Path, default=REPO / "data/probe/probe.h5")
    parser.add_argument("--utae", type=Path, default=REPO / "data/utae/utae.h5")
    parser.add_argument("--jobs", type=int, default=1, help="seeds run at once (each its own process)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process (keep jobs x threads <= cores)")
    parser.add_argument("--autoattack", default="off", choices=("off", "fast", "standard"))
    parser.add_argument("--threshold", type=float, default=0.6, help="the transfer every class should reach")
    parser.add_argument("--summary", nargs="+", type=Path, metavar="OUT", help="tabulate finished runs; run nothing")
    parser.add_argument("--by-margin", action="store_true",
                        help="with --summary: where the students lose each class, by the teacher's margin")
    args = parser.parse_args(argv)
    if args.summary:
        show(args.summary, args.threshold)
        if args.by_margin:
            print("\n" + by_margin(args.summary, args.params, args.teacher))
        return
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise SystemExit(f"error: --seeds: expected comma-separated integers such as 0,1,2, got {args.seeds!r}") from None
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"error: --seeds: {args.seeds!r} repeats a seed")
    if not seeds or args.out is None or args.jobs < 1 or args.threads < 1:
        raise SystemExit("error: give --out, at least one seed, --jobs >= 1 and --threads >= 1")
    if args.out.exists():
        raise SystemExit(f"error: {args.out} exists; choose a new --out (or --summary {args.out})")
    inputs = Inputs(args.teacher.resolve(), args.pool.resolve(), args.probe.resolve(), args.utae.resolve())
    needed = [inputs.teacher] + ([inputs.pool, inputs.probe, inputs.utae] if args.start == "distill" else [])
    missing = [str(p) for p in needed if not p.is_file()]
    if missing:
        raise SystemExit(f"error: missing {', '.join(missing)}; run `make run` (or `dvc repro`) first")
    import yaml

    try:  # every seed's params are validated before anything is written
        overrides = parse_set_options(args.sets)
        per_seed = {seed: seed_params(args.params, overrides, seed, args.autoattack) for seed in seeds}
        for raw in per_seed.values():
            params_from_mapping(raw)
    except FerdError as err:  # bad overrides: one line, non-zero exit
        raise SystemExit(f"error: {err}") from None
    plans = []
    for seed, raw in per_seed.items():
        run = args.out.resolve() / f"seed-{seed}"
        run.mkdir(parents=True)
        (run / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        plans.append((run, stage_commands(run, run / "params.yaml", inputs, args.start, args.threads)))
    print(f"{len(seeds)} seeds from `ferd {args.start}`, {args.jobs} at a time, {args.threads} thread(s) each")
    with ThreadPoolExecutor(max_workers=args.jobs) as executor:
        futures = {executor.submit(run_seed, run, commands): run for run, commands in plans}
        failed = []
        for future, run in futures.items():
            try:
                print(f"{run.name}: {future.result()}")
            except RuntimeError as err:
                failed.append(str(err))
    show([args.out], args.threshold)
    if failed:
        raise SystemExit("error: " + "; ".join(failed))


if __name__ == "__main__":
    main()
