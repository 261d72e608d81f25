"""Wall-clock time of every pipeline stage with the repository's params.yaml.

    python benchmarks/bench_stages.py [--params params.yaml] [--teacher T.safetensors] [--only synth-fae,distill]

Runs each `ferd` stage command in dvc.yaml order as a subprocess (what `dvc repro` does, torch
import included) in a temporary directory, so the repository's own outputs and DVC caches are left
alone. ``fetch-data`` runs there too (it copies the dataset from Debian's package or ``data.source``).
``--teacher`` copies an existing teacher in instead of training one (``fetch-teacher`` is then not
timed); ``--only`` times a subset (the stages before it still run, untimed). Prints seconds per
stage, the share of the total, and the total. Time alone: two heavy jobs on two cores distort both.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STAGES = (
    ["fetch-data"], ["fetch-teacher"], ["probe"], ["reweight"], ["synth-fae"], ["gen-utae"], ["distill"],
    ["evaluate", "--name", "teacher"], ["evaluate", "--name", "student"],
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--teacher", type=Path, help="use this teacher artifact instead of training one")
    ap.add_argument("--only", help="comma-separated stage names to time (default: all)")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else None
    ferd = str(Path(sys.executable).parent / "ferd")
    times = {}
    with tempfile.TemporaryDirectory(prefix="ferd-bench-") as tmp:
        work = Path(tmp)
        shutil.copy(args.params, work / "params.yaml")
        for stage in STAGES:
            name = " ".join(stage)
            if stage == ["fetch-teacher"] and args.teacher is not None:
                (work / "data/teacher").mkdir(parents=True, exist_ok=True)
                shutil.copy(args.teacher, work / "data/teacher/teacher.safetensors")
                continue
            start = time.perf_counter()
            subprocess.run([ferd, *stage], cwd=work, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if only is None or stage[0] in only or name in only:
                times[name] = time.perf_counter() - start
    total = sum(times.values())
    print(f"{'stage':<26}{'seconds':>9}{'share':>8}")
    for name, t in times.items():
        print(f"{name:<26}{t:>9.1f}{t / total:>8.1%}")
    print(f"{'total':<26}{total:>9.1f}")


if __name__ == "__main__":
    main()
