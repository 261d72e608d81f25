"""Data parallelism over processes (issue 11 item 3, docs/distributed.md): fetch-teacher (training),
synth-fae and distill as 2 gloo ranks on the CPU, launched by the stage itself (``runtime.nproc: 2``).

Each 2-rank run is a real ``python -m stages.cli <stage>`` process, compared with the same stage run in
this process (one rank). The 2-rank runs draw the same random numbers as one process and only split
the work, so they agree with it up to float reduction order, which the sign steps of PGD/UTAE and
the discrete choices (kept step, robust channels) can amplify. Measured on this setting (largest
absolute difference): pool images 1.4e-5, synthesis loss log 1.8e-6, D 2.8e-7, p 5e-8; student
weights and BatchNorm statistics 2.1e-7, distill.csv 2.5e-6 relative; teacher 1.9e-7; labels,
epochs, accuracies and the teacher's test check equal. Across the variants of docs/distributed.md
the largest were D 2.1e-4, p 4e-5, the student's BatchNorm running statistics 7.6e-5 and
distill.csv 3.8e-5 relative. The tolerances below are 7-50x the largest.

A failing rank is made by a ``sitecustomize`` module on ``PYTHONPATH`` that every Python process
imports at start-up: in rank 1 only it makes a library function raise ``FerdError`` or kill its own
process with SIGKILL, as an out-of-memory kill would.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from safetensors import safe_open
from safetensors.torch import load_file
from typer.testing import CliRunner

from ferd import distributed
from ferd.artifacts import load_h5
from ferd.config import load_params
from ferd.distributed import GlobalBatchNorm2d, Shard
from ferd.errors import ConfigError
from stages.cli import app
from tests.conftest import tiny_params, write_params

REPO = Path(__file__).resolve().parents[1]
pytestmark = [
    pytest.mark.skipif(not (torch.distributed.is_available() and torch.distributed.is_gloo_available()),
                       reason="needs torch.distributed with gloo"),
    pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="needs POSIX signals"),
]

#: teacher.train.subset 161 with batch 32: the last batch of each epoch has one row, so rank 1 has none;
#: synthesis and distill batches of 15 rows: rank 0 takes 8, rank 1 takes 7
PARAMS = tiny_params(teacher={
    "source": "train", "arch": "cnn", "width": 4, "eval_subset": 0, "eval_pgd_steps": 3,
    "train": {"epochs": 2, "batch_size": 32, "lr": 0.05, "attack_steps": 1, "attack_step_size": 1.0, "subset": 161},
})
PARAMS["fae"]["batch_size"] = PARAMS["distill"]["batch_size"] = 15
CHAIN = ("fetch-teacher", "probe", "reweight", "synth-fae", "gen-utae", "distill")
TEACHER, POOL, STUDENT = "data/teacher/teacher.safetensors", "data/fae/pool.h5", "data/student/student.safetensors"

HOOKS = """
import os
if os.environ.get("RANK") == "1" and os.environ.get("FERD_TEST_HOOK") == "raise":
    import ferd.synthesis
    from ferd.errors import FerdError

    def _fail(*args, **kwargs):
        raise FerdError("injected failure: this rank cannot go on")

    ferd.synthesis.train_shadow = _fail
if os.environ.get("RANK") == "1" and os.environ.get("FERD_TEST_HOOK") == "kill":
    import signal
    import ferd.distill

    _summary, _calls = ferd.distill._global_summary, []

    def _kill_at_the_second_epoch(*args, **kwargs):
        _calls.append(1)
        if len(_calls) == 2:  # rank 0 has saved epoch 1's run state by now (epoch 2's steps synchronise)
            os.kill(os.getpid(), signal.SIGKILL)
        return _summary(*args, **kwargs)

    ferd.distill._global_summary = _kill_at_the_second_epoch
"""


# --------------------------------------------------------------------------------------------
# helpers


def _in(root: Path, *args: str) -> None:
    cwd = os.getcwd()
    os.chdir(root)
    try:
        result = CliRunner().invoke(app, list(args))
    finally:
        os.chdir(cwd)
    assert result.exit_code == 0, f"{args}:\n{result.output}"


def _two_ranks(one: Path, dest: Path, remove: str) -> Path:
    """A copy of the one-process chain with runtime.nproc 2 and ``remove`` deleted."""
    shutil.copytree(one, dest)
    params = yaml.safe_load((dest / "params.yaml").read_text())
    params["runtime"]["nproc"] = 2
    write_params(dest / "params.yaml", params)
    (dest / remove).unlink()
    return dest


def _run(root: Path, stage: str, hook: str | None = None) -> subprocess.CompletedProcess:
    hooks = root / "hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(HOOKS)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(hooks), str(REPO)]),
           "FERD_TEST_HOOK": hook or ""}
    env.pop("RANK", None)
    return subprocess.run([sys.executable, "-m", "stages.cli", stage], cwd=root, env=env, capture_output=True,
                          text=True, timeout=300)


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel())


def _meta(path: Path) -> dict:
    import json

    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["ferd"])


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> Path:
    """The tiny chain up to distill, every stage in one process: the reference."""
    root = tmp_path_factory.mktemp("one")
    write_params(root / "params.yaml", PARAMS)
    for stage in CHAIN:
        _in(root, stage)
    return root


# --------------------------------------------------------------------------------------------
# the three stages on two ranks


def test_synth_fae_on_two_ranks_matches_one_process(one, tmp_path):
    two = _two_ranks(one, tmp_path / "two", POOL)
    result = _run(two, "synth-fae")
    assert result.returncode == 0, result.stderr
    assert "synth-fae: 2 processes (runtime.nproc), torch.distributed with gloo" in result.stderr
    a, _ = load_h5(one / POOL, kind="pool")
    b, _ = load_h5(two / POOL, kind="pool")
    assert a.keys() == b.keys()
    np.testing.assert_array_equal(a["y"], b["y"])
    np.testing.assert_array_equal(a["epoch"], b["epoch"])
    np.testing.assert_allclose(b["x"], a["x"], rtol=0, atol=1e-4)
    for key in ("p_history", "p_next", "D_history", "D_next"):
        np.testing.assert_allclose(b[key], a[key], rtol=0, atol=1e-2, err_msg=key)
    for key in ("log_total", "log_bn", "log_oh", "log_adv", "log_uni"):
        np.testing.assert_allclose(b[key], a[key], rtol=1e-4, atol=1e-6, err_msg=key)
    for key in ("log_teacher_acc", "log_robust_channels", "log_probe_adv_acc"):
        np.testing.assert_array_equal(b[key], a[key], err_msg=key)
    assert not (two / "runs").exists()  # rank 0 cleared the run state


@pytest.fixture(scope="module")
def distill_two(one, tmp_path_factory) -> Path:
    two = _two_ranks(one, tmp_path_factory.mktemp("distill") / "two", STUDENT)
    result = _run(two, "distill")
    assert result.returncode == 0, result.stderr
    return two


def test_distill_on_two_ranks_matches_one_process(one, distill_two):
    assert _max_diff(load_file(one / STUDENT), load_file(distill_two / STUDENT)) < 1e-3  # BN running stats
    rows_one = (one / "metrics/distill.csv").read_text().splitlines()
    rows_two = (distill_two / "metrics/distill.csv").read_text().splitlines()
    assert rows_one[0] == rows_two[0] and len(rows_one) == len(rows_two) == 4  # header + 3 student epochs
    for r1, r2 in zip(rows_one[1:], rows_two[1:], strict=True):
        np.testing.assert_allclose([float(v) for v in r2.split(",")], [float(v) for v in r1.split(",")],
                                   rtol=1e-3, atol=1e-6)


def test_teacher_training_on_two_ranks_matches_one_process(one, tmp_path):
    two = _two_ranks(one, tmp_path / "two", TEACHER)
    result = _run(two, "fetch-teacher")
    assert result.returncode == 0, result.stderr
    assert _max_diff(load_file(one / TEACHER), load_file(two / TEACHER)) < 1e-5
    m1, m2 = _meta(one / TEACHER), _meta(two / TEACHER)
    for key in ("clean_acc", "pgd_acc"):
        assert m2["check"][key] == m1["check"][key], key
    np.testing.assert_allclose([[r["adv_loss"], r["adv_acc"]] for r in m2["train_log"]],
                               [[r["adv_loss"], r["adv_acc"]] for r in m1["train_log"]], rtol=1e-4, atol=1e-6)


# --------------------------------------------------------------------------------------------
# a failing rank: one error line, no artifact; a killed rank: then the rerun resumes


def test_a_failing_rank_fails_the_stage_with_one_line_and_no_artifact(one, tmp_path):
    two = _two_ranks(one, tmp_path / "two", POOL)
    result = _run(two, "synth-fae", hook="raise")
    assert result.returncode == 1
    assert _error_lines(result.stderr) == ["error: rank 1 of 2: injected failure: this rank cannot go on"], result.stderr
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in (two / "data/fae").iterdir()) == []


def test_a_killed_rank_leaves_no_artifact_and_the_rerun_resumes(distill_two, tmp_path):
    two = _two_ranks(distill_two, tmp_path / "killed", STUDENT)
    killed = _run(two, "distill", hook="kill")
    assert killed.returncode != 0
    lines = _error_lines(killed.stderr)
    assert len(lines) == 1 and lines[0].startswith("error: rank 1 of 2 was killed by SIGKILL"), killed.stderr
    assert "Traceback" not in killed.stderr
    assert sorted(p.name for p in (two / "data/student").iterdir()) == []
    assert len(list((two / "runs/distill").glob("*/state.safetensors"))) == 1  # rank 0 saved epoch 1

    rerun = _run(two, "distill")
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming from the run state" in rerun.stderr
    assert (two / STUDENT).read_bytes() == (distill_two / STUDENT).read_bytes()
    assert (two / "metrics/distill.csv").read_bytes() == (distill_two / "metrics/distill.csv").read_bytes()
    assert not (two / "runs").exists()


# --------------------------------------------------------------------------------------------
# the pieces, in this process


def test_runtime_nproc_is_validated(tmp_path):
    assert load_params(write_params(tmp_path / "p.yaml", tiny_params())).runtime.nproc == 1
    with pytest.raises(ConfigError, match="runtime.nproc"):
        load_params(write_params(tmp_path / "p.yaml", tiny_params(runtime={"nproc": 0})))


def test_the_stage_relaunches_itself_with_its_own_command_line(tmp_path, tiny_teacher, monkeypatch):
    launched = []
    monkeypatch.setattr(distributed, "launch", lambda command, nproc, threads: launched.append((command, nproc, threads)))
    params = write_params(tmp_path / "params.yaml", tiny_params(runtime={"device": "cpu", "threads": 3, "nproc": 2}))
    result = CliRunner().invoke(app, ["--params", str(params), "--device", "cpu", "synth-fae", "--teacher", str(tiny_teacher),
                                      "--out", str(tmp_path / "pool.h5")])
    assert result.exit_code == 0, result.output
    (command, nproc, threads), = launched
    assert (nproc, threads) == (2, 3)
    assert command[:3] == [sys.executable, "-m", "stages.cli"]
    args = command[3:]
    assert args[:5] == ["--params", str(params), "--device", "cpu", "synth-fae"]
    options = dict(zip(args[5::2], args[6::2], strict=True))
    assert options["--teacher"] == str(tiny_teacher) and options["--out"] == str(tmp_path / "pool.h5")
    assert options["--weights"] == "data/reweight/class_weights.json"  # defaults are passed on too
    assert not (tmp_path / "pool.h5").exists()  # the launching process itself computes nothing


def test_a_batch_smaller_than_nproc_is_refused_before_launching(tmp_path, tiny_teacher, monkeypatch):
    monkeypatch.setattr(distributed, "launch", lambda *a: pytest.fail("nothing may start"))
    params = write_params(tmp_path / "params.yaml", tiny_params(runtime={"device": "cpu", "nproc": 4},
                                                                 distill={"batch_size": 3}))
    result = CliRunner().invoke(app, ["--params", str(params), "distill", "--teacher", str(tiny_teacher)])
    assert result.exit_code == 1
    assert result.output.strip() == ("error: distill.batch_size is 3 but 4 processes share it (one row each at least); "
                                     "raise distill.batch_size or lower runtime.nproc")


def test_fetch_teacher_relaunches_only_when_it_trains(tmp_path, tiny_teacher, monkeypatch):
    monkeypatch.setattr(distributed, "launch", lambda *a: pytest.fail("an imported teacher needs no ranks"))
    params = write_params(tmp_path / "params.yaml", tiny_params(
        runtime={"device": "cpu", "threads": 1, "nproc": 2},
        teacher={"source": f"file:{tiny_teacher}", "arch": "cnn", "width": 4, "eval_pgd_steps": 1}))
    result = CliRunner().invoke(app, ["--params", str(params), "fetch-teacher", "--out", str(tmp_path / "t.safetensors")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "t.safetensors").is_file()


def _fake_world(monkeypatch, world: int, rank: int) -> None:
    monkeypatch.setattr(distributed, "world_size", lambda: world)
    monkeypatch.setattr(distributed, "rank", lambda: rank)


def test_shards_split_the_batch_with_the_extra_rows_first(monkeypatch):
    assert distributed.shard(5) == Shard(0, 5, 5, (5,))
    spans = []
    for r in range(3):
        _fake_world(monkeypatch, 3, r)
        sh = distributed.shard(7)
        spans.append((sh.start, sh.stop))
        assert sh.sizes == (3, 2, 2) and sh.n == sh.sizes[r]
    assert spans == [(0, 3), (3, 5), (5, 7)]
    assert torch.equal(Shard(3, 5, 7, (3, 2, 2)).rows(torch.arange(7)), torch.tensor([3, 4]))
    _fake_world(monkeypatch, 4, 3)
    with pytest.raises(ConfigError, match=r"fae.batch_size is 3 but 4 processes share it.*runtime.nproc"):
        distributed.shard(3, "fae.batch_size")
    assert distributed.shard(3, allow_empty=True).n == 0  # the last partial batch of a teacher epoch


def test_boundary_hee_rows_form_a_shard_of_the_global_hee_batch(monkeypatch):
    from ferd.config import DistillConfig
    from ferd.distill import boundary_rows

    half, whole = DistillConfig(batch_size=7, boundary="hee"), DistillConfig(batch_size=7, boundary="hee", boundary_fraction=1.0)
    assert boundary_rows(DistillConfig(batch_size=7), None) == (0, None)  # off
    assert boundary_rows(half, None) == (4, None)  # round(3.5) = 4 in one process
    spans = []
    for r in range(3):
        _fake_world(monkeypatch, 3, r)
        sh = distributed.shard(7)
        n, bsh = boundary_rows(half, sh)
        assert bsh.sizes == (2, 1, 1) and n == bsh.n == bsh.sizes[r]  # every rank's first rows, at least one
        spans.append((bsh.start, bsh.stop))
        n, bsh = boundary_rows(whole, sh)
        assert bsh == sh and n == sh.n  # fraction 1: the HEE batch is the batch, split alike
    assert spans == [(0, 2), (2, 3), (3, 4)]


def test_threads_are_split_between_the_ranks_of_a_machine(monkeypatch):
    assert distributed.threads_per_rank(0, 1) == 0 and distributed.threads_per_rank(3, 1) == 3  # one rank: as given
    assert distributed.threads_per_rank(8, 2) == 4 and distributed.threads_per_rank(1, 2) == 1
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    assert distributed.threads_per_rank(0, 8) == 2  # 0 = every core, split


def test_one_process_collectives_are_the_identity():
    t = torch.randn(4, 3, requires_grad=True)
    assert not distributed.active() and distributed.is_main() and distributed.world_size() == 1
    assert distributed.all_reduce_sum_grad(t) is t and distributed.broadcast_from_main(t) is t
    assert distributed.all_gather_rows(t, Shard(0, 4, 4, (4,))) is t
    assert torch.equal(distributed.all_gather_stack(t), t[None])
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.BatchNorm2d(2))
    assert distributed.data_parallel(model, "cpu") is model
    assert type(distributed.convert_batchnorm(model, "cpu")[1]) is torch.nn.BatchNorm2d  # nothing to make global


def test_global_batchnorm_swaps_in_and_out_keeping_parameters_and_buffers(monkeypatch):
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 3), torch.nn.Sequential(torch.nn.BatchNorm2d(2)))
    bn = model[1][0]
    keys = list(model.state_dict())
    monkeypatch.setattr(distributed, "active", lambda: True)
    distributed.convert_batchnorm(model, "cpu")
    swapped = model[1][0]
    assert type(swapped) is GlobalBatchNorm2d
    assert swapped.weight is bn.weight and swapped.running_var is bn.running_var
    assert list(model.state_dict()) == keys
    distributed.revert_batchnorm(model)
    assert type(model[1][0]) is torch.nn.BatchNorm2d and model[1][0].running_mean is bn.running_mean


def test_global_losses_equal_the_one_process_losses_in_one_process():
    from ferd.fae import BNStatsLoss, GlobalBNStatsLoss, global_ikl_share
    from ferd.losses import ikl

    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    assert torch.allclose(global_ikl_share(t, s, Shard(0, 6, 6, (6,))), ikl(t, s), rtol=1e-6)
    net = torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.BatchNorm2d(3), torch.nn.ReLU(), torch.nn.BatchNorm2d(3)).eval()
    for m in (net[1], net[3]):
        m.running_mean.normal_(generator=g)
        m.running_var.uniform_(0.5, 2.0, generator=g)
    x = torch.randn(5, 1, 8, 8, generator=g)
    with BNStatsLoss(net) as local, GlobalBNStatsLoss(net) as global_:
        net(x)
        assert torch.allclose(global_.collect(), local.collect(), rtol=1e-5)


def test_a_failed_launch_is_described_by_its_root_cause():
    def failure(exitcode: int, ts: int, kind: str | None = None, line: str = "") -> types.SimpleNamespace:
        data = {"ferd": {"kind": kind, "line": line}} if kind else {}
        return types.SimpleNamespace(exitcode=exitcode, timestamp=ts, error_file_data=data)

    describe = distributed._describe
    term = -signal.SIGTERM
    assert describe({0: failure(term, 2), 1: failure(1, 3, "error", "bad input; fix it")}, 2) == "rank 1 of 2: bad input; fix it"
    killed = describe({0: failure(1, 1, "peer", "connection reset"), 3: failure(-signal.SIGKILL, 2)}, 4)
    assert killed.startswith("rank 3 of 4 was killed by SIGKILL")
    assert describe({0: failure(term, 1), 1: failure(1, 2)}, 2).startswith("rank 1 of 2 crashed with exit code 1")
    assert "lost contact" in describe({0: failure(term, 1), 1: failure(1, 1, "peer", "x")}, 2)
