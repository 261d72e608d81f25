"""Wall-clock time of every pipeline stage with the repository's params.yaml.

    python benchmarks/bench_stages.py [--params params.yaml]

Runs each `ferd` stage command in dvc.yaml order as a subprocess (what `dvc repro` does, torch
import included) in a temporary copy of the working directory's inputs, so the repository's own
outputs and DVC caches are left alone. Needs the dataset (`make data`). Prints seconds per stage,
the share of the total, and the total.
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
    ["fetch-teacher"], ["probe"], ["reweight"], ["synth-fae"], ["gen-utae"], ["distill"],
    ["evaluate", "--name", "teacher"], ["evaluate", "--name", "student"],
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args()
    ferd = str(Path(sys.executable).parent / "ferd")
    with tempfile.TemporaryDirectory(prefix="ferd-bench-") as tmp:
        work = Path(tmp)
        shutil.copy(args.params, work / "params.yaml")
        (work / "data").mkdir()
        (work / "data" / "raw").symlink_to(Path("data/raw").resolve())
        times = {}
        for stage in STAGES:
            start = time.perf_counter()
            subprocess.run([ferd, *stage], cwd=work, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            times[" ".join(stage)] = time.perf_counter() - start
    total = sum(times.values())
    print(f"{'stage':<26}{'seconds':>9}{'share':>8}")
    for name, t in times.items():
        print(f"{name:<26}{t:>9.1f}{t / total:>8.1%}")
    print(f"{'total':<26}{total:>9.1f}")


if __name__ == "__main__":
    main()
