"""A writer killed with SIGKILL mid-write leaves the previous complete artifact or none, never a partial one.

Each child process (``sys.executable -c``) rewrites one large artifact in a loop through
``ferd.artifacts.save_h5`` / ``save_model``, every version marked with its number ``i``. The parent
waits until a write is in progress (``atomic_path``'s temp file ``.<name>.<pid>.<random>.tmp`` exists
next to the target), waits a little longer (a different delay per child, to land at different
moments of the write), sends SIGKILL, and checks that the target is absent or loads completely with
exactly the content of some version ``i``.

The children start together (torch's import dominates) and are killed one after the other.

A killed writer's temp file stays behind until the next write of the same artifact: ``atomic_path``
removes it in a ``finally`` that SIGKILL never reaches, so every write first deletes the temp files
of its target whose writer process is gone. ``test_*`` below check that such leftovers are hidden
dot-files of atomic_path's pattern, never the target, and gone after the next successful write.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from ferd.artifacts import load_h5, load_model

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX SIGKILL")

H5_ROWS = 384  # 384 x 1 x 64 x 64 float32 = 6 MB of noise: gzip makes a write last a while
MODEL_WIDTH = 160  # ~6.6 MB of float32 weights

H5_CHILD = """
import sys
import numpy as np
from ferd.artifacts import save_h5
path, rows = sys.argv[1], int(sys.argv[2])
x = np.random.default_rng(0).random((rows, 1, 64, 64), dtype=np.float32)
i = 0
while True:
    i += 1
    x[0] = i
    save_h5(path, kind="killtest", arrays={"x": x}, attrs={"i": i})
"""

MODEL_CHILD = """
import sys
import torch
torch.set_num_threads(1)
from ferd.artifacts import model_meta, save_model
from ferd.models import build_model
path, width = sys.argv[1], int(sys.argv[2])
state = build_model("cnn", num_classes=10, in_channels=3, image_size=32, width=width).state_dict()
i = 0
while True:
    i += 1
    for t in state.values():
        t.fill_(i)
    meta = model_meta(arch="cnn", num_classes=10, input_shape=[3, 32, 32], mean=[0.0] * 3, std=[1.0] * 3,
                      dataset="killtest", source="killtest", width=width, i=i)
    save_model(path, state, meta)
"""


def _temps(target: Path) -> list[Path]:
    return sorted(target.parent.glob(f".{target.name}.*.tmp"))


def _size(p: Path) -> int:
    try:
        return p.stat().st_size
    except FileNotFoundError:  # renamed or removed meanwhile
        return -1


def _wait(condition, proc: subprocess.Popen, what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"the writer exited ({proc.returncode}) before {what}:\n{proc.stderr.read().decode()}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.001)


def _kill_writers(tmp_path: Path, code: str, arg: str, suffix: str, plans: list[tuple[bool, float, int]]) -> list[dict]:
    """Start one writer per plan; kill each mid-write; return what each left behind.

    A plan is (need_previous, delay, grown): wait for a first complete version first (need_previous),
    then for a write in progress whose temp file holds at least ``grown`` bytes, then ``delay`` seconds.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    runs = []
    for k, _plan in enumerate(plans):
        target = tmp_path / f"w{k}" / f"artifact{suffix}"
        target.parent.mkdir()
        proc = subprocess.Popen([sys.executable, "-c", code, str(target), arg], cwd=REPO, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        runs.append({"target": target, "proc": proc})
    try:
        for run, (need_previous, delay, grown) in zip(runs, plans, strict=True):
            target, proc = run["target"], run["proc"]
            if need_previous:
                _wait(target.exists, proc, "a first complete version")
            before = set(_temps(target))
            _wait(lambda t=target, b=before, n=grown: any(_size(p) >= n for p in set(_temps(t)) - b), proc,
                  f"a new temp file of {grown} bytes or more")
            time.sleep(delay)
            run["had_version"] = target.exists()
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=10)
            assert proc.returncode == -signal.SIGKILL
            run["exists"] = target.exists()
            run["leftovers"] = _temps(target)
            run["files"] = sorted(p.name for p in target.parent.iterdir())
    finally:
        for run in runs:
            if run["proc"].poll() is None:
                run["proc"].kill()
                run["proc"].wait()
            run["proc"].stderr.close()
    return runs


def _check_leftovers(run: dict) -> None:
    target = run["target"]
    assert set(run["files"]) <= {target.name} | {p.name for p in run["leftovers"]}, run["files"]
    for p in run["leftovers"]:  # hidden, atomic_path's own pattern, never the artifact itself
        assert p.name.startswith(f".{target.name}.") and p.name.endswith(".tmp") and p != target
    if run["had_version"]:
        assert run["exists"], "the previous complete version disappeared"


def test_killed_hdf5_writer_leaves_a_complete_version_or_none(tmp_path):
    # h5py fills the temp file mostly when it closes it: the last plan waits for that moment
    plans = [(False, 0.0, 0), (False, 0.03, 0), (True, 0.0, 0), (True, 0.08, 0), (True, 0.0, 1 << 20)]
    runs = _kill_writers(tmp_path, H5_CHILD, str(H5_ROWS), ".h5", plans)
    base = np.random.default_rng(0).random((H5_ROWS, 1, 64, 64), dtype=np.float32)
    for run in runs:
        _check_leftovers(run)
        if not run["exists"]:
            continue
        arrays, attrs = load_h5(run["target"], kind="killtest", required=("x",))
        i = attrs["i"]
        assert i >= 1
        expected = base.copy()
        expected[0] = i
        np.testing.assert_array_equal(arrays["x"], expected)
    assert sum(run["exists"] for run in runs) >= 3  # the need_previous runs had a version to keep
    # the kills landed mid-write (else this test would prove nothing): a temp file was left behind
    assert any(run["leftovers"] for run in runs), [run["files"] for run in runs]
    # ... and the next write of the same artifact removes it (its writer is dead)
    from ferd.artifacts import save_h5

    for run in runs:
        save_h5(run["target"], kind="killtest", arrays={"x": base[:1]}, attrs={"i": 0})
        assert _temps(run["target"]) == [], run["target"]


def test_killed_model_writer_leaves_a_complete_version_or_none(tmp_path):
    plans = [(False, 0.0, 0), (True, 0.0, 1 << 20)]
    runs = _kill_writers(tmp_path, MODEL_CHILD, str(MODEL_WIDTH), ".safetensors", plans)
    for run in runs:
        _check_leftovers(run)
        if not run["exists"]:
            continue
        model, meta = load_model(run["target"], produced_by=None)
        i = meta["i"]
        assert i >= 1 and meta["width"] == MODEL_WIDTH
        for name, tensor in model.state_dict().items():
            assert bool((tensor == i).all()), f"{name} is not version {i} throughout"
    assert runs[1]["exists"]  # it had a version to keep
