"""Damage survey: how many randomly damaged artifacts load silently (issue 12).

    python benchmarks/damage_survey.py [--root DIR] [--damages 1000] [--seed 12] [--every-byte]

Damages each artifact (pool, UTAE file, probe file, teacher, student) ``--damages`` times with
``tests/test_damage.py``'s ``damage`` (a flipped bit, 1-63 or 64-4095 overwritten bytes, or a
truncation, anywhere in the file, seeded) and reads every copy with the loader the stages use.
Prints, per artifact: clean errors (``ArtifactError``), unchanged reads (exactly the original
content), silent loads (no error, changed content), other exceptions, and warnings seen on
unchanged reads. ``--every-byte`` flips the lowest bit of every byte of every file instead (one
read per byte: minutes). ``--root`` is a workspace holding the artifacts under dvc.yaml's paths; without it
the tiny test chain is built in a temporary folder. It uses whichever ``ferd`` is importable, so
the same script measures an older checkout (run it with that checkout's interpreter).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import numpy as np

import ferd.artifacts  # the interpreter's own ferd and stages, imported before the tests' folder joins sys.path
import stages.cli  # noqa: F401
from ferd.errors import ArtifactError

sys.path.append(str(Path(__file__).resolve().parents[1]))
from tests.test_damage import ARTIFACTS, damage, read, same  # noqa: E402


def build_chain(root: Path) -> None:
    from typer.testing import CliRunner

    from stages.cli import app
    from tests.conftest import tiny_params, write_params
    from tests.test_stages import CHAIN

    write_params(root / "params.yaml", tiny_params())
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for stage in CHAIN:
            result = CliRunner().invoke(app, [stage])
            if result.exit_code != 0:
                raise SystemExit(f"{stage} failed:\n{result.output}")
    finally:
        os.chdir(cwd)


def every_byte(data: bytes) -> Iterator[bytes]:
    for i in range(len(data)):
        yield data[:i] + bytes([data[i] ^ 1]) + data[i + 1:]


def survey(root: Path, work: Path, damages: int | None, seed: int) -> None:
    """``damages`` seeded damages per artifact, or (None) the lowest bit of every byte flipped."""
    for kind, (rel, _stage) in ARTIFACTS.items():
        original = root / rel
        data, reference = original.read_bytes(), read(kind, original)
        rng = np.random.default_rng(seed)
        path = work / original.name
        counts: Counter[str] = Counter()
        blobs = every_byte(data) if damages is None else (damage(data, rng)[0] for _ in range(damages))
        for blob in blobs:
            path.write_bytes(blob)
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    got = read(kind, path)
                except ArtifactError:
                    counts["error"] += 1
                    continue
                except Exception as exc:  # a survey: count whatever else the loader lets through
                    counts[f"other {type(exc).__name__}"] += 1
                    continue
            if not same(reference, got):
                counts["SILENT"] += 1
            else:
                counts["unchanged" + (" with a warning" if caught else "")] += 1
        text = "  ".join(f"{k} {v}" for k, v in sorted(counts.items()))
        what = "every byte's bit 0 flipped" if damages is None else f"{damages} damages"
        print(f"{kind:8s} {len(data):7d} bytes  {what}: {text}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--root", type=Path, default=None)
    ap.add_argument("--damages", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=12)
    ap.add_argument("--every-byte", action="store_true", help="flip the lowest bit of every byte instead")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="ferd-damage-") as tmp:
        root = args.root
        if root is None:
            root = Path(tmp) / "chain"
            root.mkdir()
            build_chain(root)
        work = Path(tmp) / "damaged"
        work.mkdir()
        import tests

        print(f"ferd.artifacts from {ferd.artifacts.__file__} (format version {ferd.artifacts.FORMAT_VERSION}), "
              f"tests from {Path(tests.__file__).parent}")
        survey(root.resolve(), work, None if args.every_byte else args.damages, args.seed)


if __name__ == "__main__":
    main()
