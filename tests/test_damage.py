"""A damaged artifact never loads silently (issue 12).

Damage anywhere in an artifact gives either a clean one-line ``ArtifactError`` that names the file
and the stage that rewrites it, or exactly the original content (arrays, attributes, state dict and
metadata, compared bit for bit). Nothing else: no other exception, no changed value, no warning.

The artifacts are the tiny chain's real outputs (all six stages, one module fixture). Each is
damaged ``DAMAGES`` times, seeded: one flipped bit, 1-63 overwritten bytes, 64-4095 overwritten
bytes, or a truncation, anywhere in the file; every damaged copy is read with the loader the stages
use. On the format-1 code (commit 88ae8ee) the same survey with 1 000 damages each
(benchmarks/damage_survey.py) loaded 5 pools, 3 UTAE files, 8 probe files, 496 teachers and 503
students with changed content and no error; docs/artifacts.md has the figures.
"""

from __future__ import annotations

import os
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ferd.artifacts import load_h5, load_model
from ferd.errors import ArtifactError
from ferd.runstate import RunState
from stages.cli import app
from tests.conftest import tiny_params, write_params
from tests.test_stages import CHAIN, OUTPUTS

runner = CliRunner()
DAMAGES = 500
TEACHER, PROBE, _WEIGHTS, POOL, UTAE, STUDENT = OUTPUTS
#: artifact kind -> (path in the chain, the stage that writes it)
ARTIFACTS = {
    "pool": (POOL, "synth-fae"),
    "utae": (UTAE, "gen-utae"),
    "probe": (PROBE, "probe"),
    "teacher": (TEACHER, "fetch-teacher"),
    "student": (STUDENT, "distill"),
}


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    """Every artifact of the tiny setting, written by the six stages."""
    root = tmp_path_factory.mktemp("chain")
    write_params(root / "params.yaml", tiny_params())
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for stage in CHAIN:
            result = runner.invoke(app, [stage])
            assert result.exit_code == 0, f"{stage}:\n{result.output}"
    finally:
        os.chdir(cwd)
    return root


def damage(data: bytes, rng: np.random.Generator) -> tuple[bytes, str]:
    """One seeded damage anywhere in ``data`` (never a no-op), and what it was."""
    buf = bytearray(data)
    mode = int(rng.integers(4))
    if mode == 0:
        n = int(rng.integers(0, len(buf)))
        return bytes(buf[:n]), f"truncated to {n}"
    start = int(rng.integers(0, len(buf)))
    if mode == 1:
        bit = int(rng.integers(8))
        buf[start] ^= 1 << bit
        return bytes(buf), f"bit {bit} of byte {start} flipped"
    end = min(len(buf), start + int(rng.integers(1, 64) if mode == 2 else rng.integers(64, 4096)))
    while True:
        new = rng.integers(0, 256, end - start, dtype=np.uint8).tobytes()
        if new != bytes(buf[start:end]):
            break
    buf[start:end] = new
    return bytes(buf), f"bytes {start}:{end} overwritten"


def read(kind: str, path: Path) -> tuple[Any, Any]:
    """What the stages get from the artifact: (state dict, meta) of a model, (arrays, attrs) of an image set."""
    if kind in ("teacher", "student"):
        model, meta = load_model(path, produced_by=ARTIFACTS[kind][1])
        return model.state_dict(), meta
    return load_h5(path, kind=kind)


def same(a: Any, b: Any) -> bool:
    """Exactly equal: same types, keys, dtypes, shapes and bytes (NaN equals NaN)."""
    if isinstance(a, dict):
        return isinstance(b, dict) and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, torch.Tensor):
        return (isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape
                and _bytes(a) == _bytes(b))
    if isinstance(a, np.ndarray):
        return isinstance(b, np.ndarray) and a.dtype == b.dtype and a.shape == b.shape and a.tobytes() == b.tobytes()
    if isinstance(a, float) and isinstance(b, float) and a != a:
        return b != b
    return type(a) is type(b) and a == b


def _bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def test_same_sees_one_changed_bit():
    x = np.arange(6, dtype=np.float32)
    y = x.copy()
    y.view(np.uint8)[5] ^= 1
    assert same({"x": x, "m": [1, "a"]}, {"x": x.copy(), "m": [1, "a"]})
    assert not same({"x": x}, {"x": y}) and not same({"m": [1]}, {"m": [1.0]})
    t = torch.arange(4.0)
    assert not same({"w": t}, {"w": t.to(torch.float64)}) and not same({"w": t}, {"w": t.reshape(2, 2)})
    assert same({"n": torch.tensor(3)}, {"n": torch.tensor(3)}) and not same({"n": torch.tensor(3)}, {"n": torch.tensor(2)})
    assert not same({"w": torch.tensor([0.0])}, {"w": torch.tensor([-0.0])})


@pytest.mark.parametrize("kind", sorted(ARTIFACTS))
def test_damage_is_a_clean_error_or_an_unchanged_read(kind, chain, tmp_path):
    rel, stage = ARTIFACTS[kind]
    original = chain / rel
    data, reference = original.read_bytes(), read(kind, original)
    rng = np.random.default_rng(list(ARTIFACTS).index(kind))
    path = tmp_path / original.name
    outcomes: Counter[str] = Counter()
    wrong: list[str] = []
    for _ in range(DAMAGES):
        blob, how = damage(data, rng)
        path.write_bytes(blob)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                got = read(kind, path)
            except ArtifactError as exc:
                message = str(exc)
                if "\n" in message or not message.startswith(f"{path}: ") or f"`ferd {stage}`" not in message:
                    wrong.append(f"{how}: unclear error {message!r}")
                outcomes["error"] += 1
                continue
        if not same(reference, got):
            wrong.append(f"{how}: loaded silently with changed content")
        elif caught:
            wrong.append(f"{how}: loaded with warnings {[str(w.message) for w in caught]}")
        outcomes["unchanged"] += 1
    assert not wrong, f"{len(wrong)} of {DAMAGES} damaged {kind} files: " + "; ".join(wrong[:5])
    assert outcomes["error"] > DAMAGES // 2, outcomes  # the damage does hit what is read


def test_cli_names_the_damaged_dataset_and_the_stage(chain, tmp_path):
    """A changed byte inside the pool's image data: one error line from gen-utae, naming `x` and synth-fae."""
    import h5py

    with h5py.File(chain / POOL) as fh:
        chunk = fh["x"].id.get_chunk_info(0)
    data = bytearray((chain / POOL).read_bytes())
    data[chunk.byte_offset + chunk.size // 2] ^= 0x10
    bad = tmp_path / "pool.h5"
    bad.write_bytes(bytes(data))
    out = tmp_path / "utae.h5"
    result = runner.invoke(app, ["--params", str(write_params(tmp_path / "params.yaml", tiny_params())), "gen-utae",
                                 "--teacher", str(chain / TEACHER), "--pool", str(bad), "--out", str(out),
                                 "--hist", str(tmp_path / "hist.csv")])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[-1] == (f"error: {bad}: damaged (checksum mismatch in dataset x); delete it and rerun `ferd synth-fae` "
                         "(or `dvc repro`)")
    assert not out.exists()


def test_damaged_run_state_is_an_error(tmp_path):
    """A run state is checked like an artifact: a changed byte in a tensor never resumes silently."""
    rs = RunState(tmp_path / "runs", "distill", {"params": {}})
    rs.save({"epoch": 3, "w": torch.arange(64, dtype=torch.float32)})
    data = bytearray(rs.path.read_bytes())
    data[-5] ^= 0x01  # inside the last tensor's bytes
    rs.path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"damaged run state \(checksum mismatch\); delete .* to start this stage over"):
        rs.load()
