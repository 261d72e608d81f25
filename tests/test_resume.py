"""Resume (issue: reliability): run state round trip, bit-identical continuation of the three long
stages, and a distill run killed with SIGKILL that, rerun, ends with the uninterrupted run's bytes."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from ferd.errors import ArtifactError
from ferd.runstate import RunState, pack, unpack
from stages.cli import app
from tests.conftest import tiny_params, write_params
from tests.test_stages import run_chain

ROOT = Path(__file__).resolve().parents[1]


def _roundtrip(obj, tmp_path: Path):
    rs = RunState(tmp_path / "runs", "stage", {"x": 1})
    rs.save(obj)
    return rs.load()


def test_pack_unpack_round_trip_exact(tmp_path):
    obj = {
        "int_keys": {0: {"momentum_buffer": torch.randn(3, 2)}, 1: None},
        "tuple": (1, 2.5, "a", True),
        "nan": math.nan, "inf": -math.inf,
        "gen": torch.Generator().manual_seed(3).get_state(),
        "f64": torch.tensor([0.1, 0.2], dtype=torch.float64), "long": torch.arange(4),
        "list": [{"lr": 0.1, "params": [0, 1]}],
    }
    back = _roundtrip(obj, tmp_path)
    assert set(back["int_keys"]) == {0, 1} and back["int_keys"][1] is None
    assert torch.equal(back["int_keys"][0]["momentum_buffer"], obj["int_keys"][0]["momentum_buffer"])
    assert back["tuple"] == (1, 2.5, "a", True) and isinstance(back["tuple"], tuple)
    assert math.isnan(back["nan"]) and back["inf"] == -math.inf
    assert torch.equal(back["gen"], obj["gen"]) and back["f64"].dtype == torch.float64
    assert back["list"] == obj["list"]
    skeleton, tensors = pack({"a": torch.ones(2)})
    assert unpack(skeleton, tensors)["a"].tolist() == [1.0, 1.0]
    with pytest.raises(TypeError):
        pack({"bad": object()})


def test_run_state_key_load_clear_and_corrupt(tmp_path):
    a = RunState(tmp_path / "runs", "distill", {"params": {"lr": 0.1}})
    b = RunState(tmp_path / "runs", "distill", {"params": {"lr": 0.2}})
    assert a.dir != b.dir and a.load() is None
    a.save({"epoch": 1})
    assert a.load() == {"epoch": 1} and b.load() is None
    a.path.write_bytes(b"garbage")
    with pytest.raises(ArtifactError, match="delete"):
        a.load()
    a.clear()
    assert not (tmp_path / "runs").exists()


def _capture(states: list, tmp_path: Path):
    """A save_state callback that stores each state after a real save/load round trip."""
    rs = RunState(tmp_path / "cap", "s", {})

    def save(state):
        rs.save(state)
        states.append(rs.load())

    return save


def test_teacher_training_resumes_bit_identically(tmp_path):
    from ferd.config import TeacherTrainConfig, load_params
    from ferd.data import load_split
    from ferd.models import build_model
    from ferd.teacher import train_adversarially

    params = load_params(write_params(tmp_path / "p.yaml", tiny_params()))
    train = load_split(params.data, "train")
    cfg = TeacherTrainConfig(epochs=3, batch_size=32, lr=0.05, attack_steps=1, attack_step_size=1.0)

    def fresh():
        torch.manual_seed(0)
        return build_model("cnn", num_classes=4, in_channels=1, image_size=16, width=4)

    full, states = fresh(), []
    log = train_adversarially(full, train, cfg, eps=0.1, seed=0, device="cpu", save_state=_capture(states, tmp_path))
    resumed = fresh()
    log2 = train_adversarially(resumed, train, cfg, eps=0.1, seed=0, device="cpu", resume=states[0])
    assert log2 == log
    for k, v in full.state_dict().items():
        assert torch.equal(v, resumed.state_dict()[k]), k


def test_synthesis_resumes_bit_identically(tmp_path, tiny_teacher):
    from dataclasses import asdict

    from ferd.artifacts import load_model
    from ferd.config import load_params
    from ferd.synthesis import synthesize_pool

    params = load_params(write_params(tmp_path / "p.yaml", tiny_params()))
    teacher, _ = load_model(tiny_teacher)
    kw = dict(epochs=3, p0=torch.full((4,), 0.25, dtype=torch.float64), num_classes=4, image_shape=(1, 16, 16),
              eps=0.1, seed=0, device="cpu")
    states: list = []
    x, y, e, st = synthesize_pool(teacher, params.fae, params.probe, params.reweight, **kw,
                                  save_state=_capture(states, tmp_path))
    x2, y2, e2, st2 = synthesize_pool(teacher, params.fae, params.probe, params.reweight, **kw, resume=states[0])
    assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(e, e2)
    a, b = asdict(st), asdict(st2)
    assert torch.equal(a.pop("p"), b.pop("p")) and a["p_history"] == b["p_history"]
    assert json.dumps(a["rows"]) == json.dumps(b["rows"])  # NaN-aware: rows may hold NaN (no diagnostic)


def test_interleaved_distill_resumes_bit_identically(tmp_path):
    """run_distill with the interleaved schedule: the synthesis loop state is part of the run state."""
    root = tmp_path / "chain"
    run_chain(root, tiny_params(distill={"schedule": "interleaved"}))
    from ferd.artifacts import load_h5, load_model
    from ferd.config import load_params
    from ferd.data import dataset_info
    from ferd.distill import run_distill

    params = load_params(root / "params.yaml")
    teacher, _ = load_model(root / "data/teacher/teacher.safetensors")
    arrays, _ = load_h5(root / "data/fae/pool.h5", kind="pool")
    info = dataset_info(params.data)
    from ferd.synthesis import probe_data

    data = probe_data(load_h5(root / "data/probe/probe.h5", kind="probe")[0], params.data, params.probe, params.seed,
                      real_images=False)
    states: list = []
    full, rows = run_distill(teacher, arrays, params, info, cached_delta=None, device="cpu", probe_data=data,
                             save_state=_capture(states, tmp_path))
    again, rows2 = run_distill(teacher, arrays, params, info, cached_delta=None, device="cpu", probe_data=data,
                               resume=states[0])
    assert states[0]["synthesis"] is not None and json.dumps(rows2) == json.dumps(rows)
    for k, v in full.state_dict().items():
        assert torch.equal(v, again.state_dict()[k]), k


def _distill_params() -> dict:
    # enough student steps that the run lasts a few seconds after its first saved epoch
    return tiny_params(distill={"steps": 40, "batch_size": 16})


@pytest.mark.slow
def test_sigkilled_distill_resumes_to_the_uninterrupted_student(tmp_path):
    base = tmp_path / "base"
    run_chain(base, tiny_params())
    killed, clean = tmp_path / "killed", tmp_path / "clean"
    for folder in (killed, clean):
        shutil.copytree(base, folder)
        write_params(folder / "params.yaml", _distill_params())
        (folder / "data/student/student.safetensors").unlink()

    # the uninterrupted run
    cwd = os.getcwd()
    os.chdir(clean)
    try:
        result = CliRunner().invoke(app, ["distill"])
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, result.output
    assert not (clean / "runs").exists()  # the run state is deleted once the student is written

    # the killed run: SIGKILL as soon as the first epoch's state is on disk
    cmd = [sys.executable, "-c", "from stages.cli import app; app()", "distill"]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=killed, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list((killed / "runs" / "distill").glob("*/state.safetensors")):
        assert proc.poll() is None, "distill finished before it could be killed; raise its steps"
        assert time.monotonic() < deadline, "no run state appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "data/student/student.safetensors").exists()
    state_files = list((killed / "runs" / "distill").glob("*/state.safetensors"))
    assert len(state_files) == 1

    rerun = subprocess.run(cmd, cwd=killed, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming" in rerun.stderr
    assert (killed / "data/student/student.safetensors").read_bytes() == (clean / "data/student/student.safetensors").read_bytes()
    assert (killed / "metrics/distill.csv").read_bytes() == (clean / "metrics/distill.csv").read_bytes()
    assert not state_files[0].exists()


def _part_files(rs: RunState) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in sorted(rs.dir.glob("part-*.safetensors"))}


def test_checkpoints_append_pool_parts_and_never_rewrite_them(tmp_path, tiny_teacher):
    """Each synthesis epoch's images go into their own part file, written once; later saves, and a
    resumed run (a new RunState, as after a kill), only reference them."""
    from ferd.artifacts import load_model
    from ferd.config import load_params
    from ferd.synthesis import synthesize_pool

    params = load_params(write_params(tmp_path / "p.yaml", tiny_params()))
    teacher, _ = load_model(tiny_teacher)
    kw = dict(p0=torch.full((4,), 0.25, dtype=torch.float64), num_classes=4, image_shape=(1, 16, 16), eps=0.1, seed=0,
              device="cpu")
    rs = RunState(tmp_path / "runs", "synth-fae", {"k": 1})
    seen = []

    def save(state):
        rs.save(state)
        seen.append(_part_files(rs))

    synthesize_pool(teacher, params.fae, params.probe, params.reweight, epochs=2, save_state=save, **kw)
    assert [len(s) for s in seen] == [1, 2]
    assert seen[1].items() >= seen[0].items()  # epoch 1's file is the very same file after epoch 2's save
    assert len(seen[1]) == 2 and all(name.startswith("part-pool-") for name in seen[1])

    again = RunState(tmp_path / "runs", "synth-fae", {"k": 1})
    resume = again.load()
    assert [part["y"].shape[0] for part in resume["pool"]] == [16, 16]
    x, y, e, _ = synthesize_pool(teacher, params.fae, params.probe, params.reweight, epochs=3, resume=resume,
                                 save_state=again.save, **kw)
    after = _part_files(again)
    assert len(after) == 3 and after.items() >= seen[1].items()
    x_full, y_full, e_full, _ = synthesize_pool(teacher, params.fae, params.probe, params.reweight, epochs=3, **kw)
    assert torch.equal(x, x_full) and torch.equal(y, y_full) and torch.equal(e, e_full)

    next(again.dir.glob("part-*.safetensors")).unlink()
    with pytest.raises(ArtifactError, match="delete"):
        RunState(tmp_path / "runs", "synth-fae", {"k": 1}).load()


def test_distill_checkpoints_write_the_pool_once(tmp_path):
    from ferd.config import DistillConfig, UtaeConfig
    from ferd.distill import DistillState, train_student
    from tests.test_distill import _net, _pool, _teacher

    rs = RunState(tmp_path / "runs", "distill", {"k": 1})
    seen = []

    def save(snapshot):
        rs.save(snapshot.to_dict())
        seen.append(_part_files(rs))

    pool = _pool(3, 16)
    cfg = DistillConfig(steps=2, batch_size=16)
    train_student(_net(1), _teacher(), pool, cfg, UtaeConfig(steps=1), total_epochs=4, warmup=1, eps=0.1, seed=0,
                  device="cpu", on_epoch_end=save)
    assert len(seen) == 3 and len(seen[0]) == 3  # one part per synthesis epoch of the pool, at the first save
    assert seen[0] == seen[1] == seen[2]  # never rewritten
    back = DistillState.from_dict(rs.load())
    assert torch.equal(back.pool.x, pool.x) and torch.equal(back.pool.epoch, pool.epoch) and back.epoch == 3
