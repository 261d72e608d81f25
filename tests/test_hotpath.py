"""The GPU hot path (issue 11, docs/gpu.md): device-side random numbers, no per-step host syncs,
the preallocated pool, append-only run-state parts and ``runtime.precision``.

CPU byte-identity with the code before the hot path is a manual check (see docs/gpu.md); here: a seed
gives identical results on a device (CPU always, CUDA when present), the CPU "device generator" is
the CPU generator itself, and the pieces behave as specified.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from ferd.augment import apply_augment, augment_params
from ferd.config import FaeConfig, ProbeConfig, ReweightConfig, load_params
from ferd.distill import train_student
from ferd.errors import ConfigError, FerdError
from ferd.runtime import autocast, check_precision, device_generator, torch_generator
from ferd.synthesis import synthesize_pool
from stages.cli import app
from tests.conftest import tiny_params, write_params
from tests.test_distill import CFG, EPS, UTAE, _net, _pool, _teacher

CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
DEVICES = ["cpu", pytest.param("cuda", marks=CUDA)]
FAE = FaeConfig(epochs=2, warmup=1, batch_size=8, steps=2, nz=16, ngf=8, ib_steps=2, augment_pad=1, augment_flip=True,
                shadow_width=4, shadow_steps=2)


@pytest.fixture
def deterministic_kernels():
    """CUDA reruns are bit-identical only with deterministic kernels (cuDNN, index backward); ferd's
    seeding makes the random numbers identical, which is what these tests check (docs/gpu.md)."""
    if not torch.cuda.is_available():
        yield
        return
    before = torch.are_deterministic_algorithms_enabled(), torch.backends.cudnn.deterministic
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.backends.cudnn.deterministic = True
    yield
    torch.use_deterministic_algorithms(before[0])
    torch.backends.cudnn.deterministic = before[1]


# --------------------------------------------------------------------------------------------
# device generators


def test_device_generator_is_the_cpu_generator_on_the_cpu():
    g = torch_generator(0, "x")
    state = g.get_state()
    assert device_generator(g, "cpu") is g and device_generator(g, torch.device("cpu")) is g
    assert torch.equal(g.get_state(), state)  # nothing drawn: CPU runs keep their random stream
    assert device_generator(None, "cpu") is None


@CUDA
def test_device_generator_on_cuda_is_seeded_from_the_cpu_generator():
    a = device_generator(torch_generator(0, "x"), "cuda")
    b = device_generator(torch_generator(0, "x"), "cuda")
    assert a.device.type == "cuda"
    assert torch.equal(torch.rand(4, generator=a, device=a.device), torch.rand(4, generator=b, device=b.device))
    g = torch_generator(0, "x")
    first, second = device_generator(g, "cuda"), device_generator(g, "cuda")  # successive calls: distinct streams
    assert not torch.equal(torch.rand(4, generator=first, device="cuda"), torch.rand(4, generator=second, device="cuda"))


def test_augment_draws_nothing_without_shift_and_flip():
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    params = augment_params(8, 0, False, g)
    assert params == (None, None, None) and torch.equal(g.get_state(), state)
    x = torch.rand(8, 1, 6, 6)
    assert apply_augment(x, 0, params) is x
    oy, ox, flips = augment_params(8, 1, True, g)
    assert oy.device == ox.device == flips.device == g.device


# --------------------------------------------------------------------------------------------
# a seed gives the same results on a device


def _synth(device: str, teacher: torch.nn.Module):
    return synthesize_pool(teacher, FAE, ProbeConfig(per_class=2, steps=2), ReweightConfig(), epochs=2,
                           p0=torch.full((4,), 0.25, dtype=torch.float64), num_classes=4, image_shape=(1, 16, 16),
                           eps=EPS, seed=3, device=device)


@pytest.mark.parametrize("device", DEVICES)
def test_device_rng_gives_identical_synthesis_for_a_seed(device, deterministic_kernels):
    x, y, e, state = _synth(device, _teacher())
    x2, y2, e2, state2 = _synth(device, _teacher())
    assert x.device.type == "cpu" and x.shape == (16, 1, 16, 16) and e.tolist() == [1] * 8 + [2] * 8
    assert torch.equal(x, x2) and torch.equal(y, y2) and torch.equal(e, e2) and state.rows == state2.rows


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", ["noise", "cached", "pgd"])
def test_device_rng_gives_identical_students_for_a_seed(device, variant, deterministic_kernels):
    pool = _pool()
    cfg = replace(CFG, augment_flip=True)
    delta = None
    if variant == "cached":
        cfg = replace(cfg, utae_init="cached")
        delta = torch.full_like(pool.x, EPS / 2)
    elif variant == "pgd":
        cfg = replace(cfg, adversary="pgd")

    def run():
        student = _net(1)
        state = train_student(student, _teacher(), pool, cfg, UTAE, total_epochs=3, warmup=1, eps=EPS, seed=0,
                              device=device, cached_delta=delta)
        return student.cpu().state_dict(), state

    (s1, st1), (s2, st2) = run(), run()
    assert st1.log == st2.log
    for k, v in s1.items():
        assert torch.equal(v, s2[k]), k


@CUDA
def test_device_rng_gives_identical_artifacts_on_cuda(tmp_path, deterministic_kernels):
    """The tiny chain through distill and evaluate, twice on CUDA: the same bytes (CPU: test_stages)."""
    from tests.test_stages import OUTPUTS, run_chain

    params = tiny_params(runtime={"device": "cuda", "threads": 1})
    run_chain(tmp_path / "a", params)
    run_chain(tmp_path / "b", params)
    metrics = sorted(p.name for p in (tmp_path / "a" / "metrics").iterdir())
    assert "distill.csv" in metrics and "student.json" in metrics
    for out in [*OUTPUTS, *(f"metrics/{m}" for m in metrics)]:
        assert (tmp_path / "a" / out).read_bytes() == (tmp_path / "b" / out).read_bytes(), out


# --------------------------------------------------------------------------------------------
# the hot loops read the device once per epoch


def test_distill_reports_the_first_non_finite_step_after_the_epoch():
    pool = _pool(2, 16)
    calls = []
    student = _net(1)
    real = student.forward

    def forward(x):  # the training-mode forwards (two per step) are finite for two steps, NaN after
        if not student.training:
            return real(x)  # the adversary's
        calls.append(1)
        out = real(x)
        return out * float("nan") if len(calls) > 4 else out

    student.forward = forward
    with pytest.raises(FerdError, match=r"non-finite loss_clean \(nan\) at epoch 2, step 3"):
        train_student(student, _teacher(), pool, CFG, UTAE, total_epochs=2, warmup=1,
                      eps=EPS, seed=0, device="cpu")
    assert len(calls) == 2 * CFG.steps  # the epoch's steps all ran: the check is once per epoch


def test_distill_progress_carries_values_once_per_epoch():
    calls = []
    train_student(_net(1), _teacher(), _pool(), CFG, UTAE, total_epochs=3, warmup=1, eps=EPS, seed=0, device="cpu",
                  progress=lambda task, done, total, info: calls.append((done, dict(info))))
    assert [c[0] for c in calls] == list(range(1, 7))
    assert [set(c[1]) for c in calls] == [set(), set(), {"epoch", "loss"}] * 2


def _sync_count(fn) -> int:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
            torch.cuda.synchronize()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


@CUDA
def test_no_host_sync_per_step_on_cuda():
    from ferd.fae import synthesize_epoch

    teacher = _teacher().cuda()
    p = torch.full((4,), 0.25)

    def synth(steps):
        cfg = replace(FAE, steps=steps)
        return lambda: synthesize_epoch(teacher, _net(2).cuda(), p, cfg, image_shape=(1, 16, 16),
                                        generator=torch.Generator().manual_seed(0), device="cuda")

    def distill(steps):
        cfg = replace(CFG, steps=steps)
        return lambda: train_student(_net(1), teacher, _pool(), cfg, UTAE, total_epochs=2, warmup=1, eps=EPS, seed=0,
                                     device="cuda")

    synth(1)()  # warm up (cuDNN, allocator)
    assert _sync_count(synth(5)) == _sync_count(synth(1))
    assert _sync_count(distill(5)) == _sync_count(distill(1))


# --------------------------------------------------------------------------------------------
# the pool: a preallocated buffer


def test_pool_append_fills_a_preallocated_buffer_and_never_overwrites_a_view():
    pool = _pool(1, 16)
    a = pool.append(torch.zeros(8, 1, 16, 16), torch.zeros(8, dtype=torch.long), 2, reserve=24)
    b = a.append(torch.ones(8, 1, 16, 16), torch.ones(8, dtype=torch.long), 3)
    c = b.append(torch.full((8, 1, 16, 16), 2.0), torch.full((8,), 2), 4)
    assert a.x.data_ptr() == b.x.data_ptr() == c.x.data_ptr() != pool.x.data_ptr()  # one allocation for three appends
    assert len(pool) == 16 and len(a) == 24 and len(b) == 32 and len(c) == 40
    assert c.epoch.tolist() == [1] * 16 + [2] * 8 + [3] * 8 + [4] * 8
    assert torch.equal(c.x[:16], pool.x) and c.x[16:24].eq(0).all() and c.x[32:].eq(2).all()
    fork = a.append(torch.full((8, 1, 16, 16), 5.0), torch.full((8,), 3), 3)  # a is not the newest view: copy
    assert fork.x.data_ptr() != a.x.data_ptr() and fork.x[24:].eq(5).all()
    assert b.x[24:].eq(1).all() and c.x[24:32].eq(1).all()  # the newer pools are untouched
    full = c.append(torch.zeros(1, 1, 16, 16), torch.zeros(1, dtype=torch.long), 5)  # no room left: grows (2x)
    assert len(full) == 41 and torch.equal(full.x[:40], c.x)
    with pytest.raises(ValueError, match="labels"):
        pool.append(torch.zeros(2, 1, 16, 16), torch.zeros(3, dtype=torch.long), 2)


def test_interleaved_pool_grows_in_one_buffer():
    pool = _pool(1, 16)
    ptrs = []

    def synthesize(epoch, model):
        return torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(epoch)), torch.arange(8) % 4

    def record(state):
        ptrs.append(state.pool.x.data_ptr())

    state = train_student(_net(1), _teacher(), pool, replace(CFG, schedule="interleaved"), UTAE, total_epochs=4,
                          warmup=1, eps=EPS, seed=0, device="cpu", synthesize=synthesize, on_epoch_end=record)
    assert len(state.pool) == 16 + 3 * 8 and len(set(ptrs)) == 1


# --------------------------------------------------------------------------------------------
# runtime.precision


def test_bf16_is_refused_off_cuda(tmp_path):
    with pytest.raises(ConfigError, match="fp32"):
        load_params(write_params(tmp_path / "p.yaml", tiny_params(runtime={"device": "cpu", "precision": "bf16"})))
    with pytest.raises(ConfigError, match="fp32"):
        check_precision("bf16", torch.device("cpu"))
    check_precision("fp32", torch.device("cpu"))
    assert load_params(write_params(tmp_path / "q.yaml", tiny_params())).runtime.precision == "fp32"
    with autocast("cpu", "bf16"):  # never autocast off CUDA, whatever the caller passes
        assert not torch.is_autocast_enabled("cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="device auto resolves to CUDA here")
def test_bf16_with_device_auto_on_a_cpu_machine_is_one_error_line(tmp_path, tiny_teacher, monkeypatch):
    monkeypatch.chdir(tmp_path)
    params = write_params(tmp_path / "params.yaml", tiny_params(runtime={"device": "auto", "precision": "bf16"}))
    result = CliRunner().invoke(app, ["--params", str(params), "synth-fae", "--teacher", str(tiny_teacher)])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "bf16" in errors[0] and "runtime.precision: fp32" in errors[0], result.stderr
    assert not (tmp_path / "data").exists()


@CUDA
def test_bf16_autocast_runs_the_hot_loops_on_cuda():
    from ferd.fae import synthesize_epoch

    teacher = _teacher().cuda()
    out = synthesize_epoch(teacher, _net(2).cuda(), torch.full((4,), 0.25), FAE, image_shape=(1, 16, 16),
                           generator=torch.Generator().manual_seed(0), device="cuda", precision="bf16")
    assert out.x.dtype == torch.float32 and torch.isfinite(torch.tensor(list(out.log.values()))).all()
    state = train_student(_net(1), teacher, _pool(), CFG, UTAE, total_epochs=2, warmup=1, eps=EPS, seed=0,
                          device="cuda", precision="bf16")
    assert math.isfinite(state.log[-1]["loss"]) and 0.0 <= state.log[-1]["train_agreement"] <= 1.0
