"""Robust distillation (§2.6, §2.7, §3 C): loss, pool, holdout, the training loop and its schedules."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import pytest
import torch
from torch import nn

from ferd.augment import apply_augment, augment, augment_params
from ferd.config import DistillConfig, UtaeConfig
from ferd.distill import (
    LOG_COLUMNS,
    Pool,
    average_decay,
    mix_batch,
    student_loss,
    train_student,
    update_average,
)
from ferd.errors import ConfigError, FerdError
from ferd.losses import ikl, kl_div
from ferd.models import build_model

EPS = 0.1
CFG = DistillConfig(steps=3, batch_size=16, augment_pad=2, lr=0.05)
HOLDOUT = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(99))  # extra images, not in the pool
UTAE = UtaeConfig(steps=2)


def _net(seed: int, width: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("cnn", width=width, num_classes=4, in_channels=1, image_size=16)


def _teacher() -> nn.Module:
    return _net(100, width=8).eval()


def _pool(epochs: int = 3, per_epoch: int = 16, seed: int = 0) -> Pool:
    g = torch.Generator().manual_seed(seed)
    n = epochs * per_epoch
    return Pool(
        x=torch.rand(n, 1, 16, 16, generator=g),
        y=torch.arange(n) % 4,
        epoch=torch.arange(n) // per_epoch + 1,
    )


def _train(pool=None, cfg=CFG, utae=UTAE, seed=0, student=None, teacher=None, **kw):
    student = student if student is not None else _net(1)
    teacher = teacher if teacher is not None else _teacher()
    kw.setdefault("total_epochs", 3)
    kw.setdefault("warmup", 1)
    state = train_student(student, teacher, pool if pool is not None else _pool(), cfg, utae,
                          eps=EPS, seed=seed, device="cpu", **kw)
    return student, teacher, state


# --------------------------------------------------------------------------------------------
# loss


def test_student_loss_kl_matches_hand_computation():
    g = torch.Generator().manual_seed(0)
    t, s, a = (torch.randn(5, 4, generator=g) for _ in range(3))
    loss, parts = student_loss(t, s, a, DistillConfig())
    p = torch.softmax(t, 1)
    hand_clean = (p * (torch.log_softmax(t, 1) - torch.log_softmax(s, 1))).sum(1).mean()
    hand_adv = (p * (torch.log_softmax(t, 1) - torch.log_softmax(a, 1))).sum(1).mean()
    assert torch.allclose(parts["loss_clean"], hand_clean, atol=1e-6)
    assert torch.allclose(parts["loss_adv"], hand_adv, atol=1e-6)
    assert torch.allclose(loss, 5 / 6 * hand_clean + 1 / 6 * hand_adv, atol=1e-6)
    assert torch.allclose(parts["loss"], loss.detach())
    weighted, _ = student_loss(t, s, a, DistillConfig(lambda_clean=2.0, lambda_adv=0.5))
    assert torch.allclose(weighted, 2.0 * kl_div(t, s) + 0.5 * kl_div(t, a), atol=1e-6)


def test_student_loss_ikl_and_zero_at_teacher():
    g = torch.Generator().manual_seed(1)
    t, s, a = (torch.randn(5, 4, generator=g) for _ in range(3))
    kl_loss, _ = student_loss(t, s, a, DistillConfig())
    ikl_loss, parts = student_loss(t, s, a, DistillConfig(loss="ikl", ikl_temperature=50.0))
    assert torch.isfinite(ikl_loss) and not torch.allclose(ikl_loss, kl_loss)
    assert torch.allclose(parts["loss_clean"], ikl(t, s, 50.0))
    zero, zparts = student_loss(t, t.clone(), t.clone(), DistillConfig())
    assert abs(float(zero)) < 1e-6 and abs(float(zparts["loss_adv"])) < 1e-6
    # the gradient flows to the student logits only
    s = s.clone().requires_grad_(True)
    loss, _ = student_loss(t.requires_grad_(True), s, a, DistillConfig())
    loss.backward()
    assert s.grad is not None and t.grad is None


def test_kl_temperature_softens_both_sides_and_keeps_the_gradient_scale():
    g = torch.Generator().manual_seed(2)
    t, s, a = (torch.randn(6, 4, generator=g) * 3 for _ in range(3))
    plain, _ = student_loss(t, s, a, DistillConfig(kl_temperature=1.0))
    assert torch.allclose(plain, 5 / 6 * kl_div(t, s) + 1 / 6 * kl_div(t, a), atol=1e-6)
    hot, parts = student_loss(t, s, a, DistillConfig(kl_temperature=4.0))
    p = torch.softmax(t / 4, 1)
    hand = 16 * (p * (torch.log_softmax(t / 4, 1) - torch.log_softmax(s / 4, 1))).sum(1).mean()
    assert torch.allclose(parts["loss_clean"], hand, atol=1e-5)
    assert not torch.allclose(hot, plain)
    # large T: T²·KL tends to the mean squared difference of the centred logits / (2C) (Hinton et al. §2.1)
    big, parts = student_loss(t, s, a, DistillConfig(kl_temperature=1000.0))
    dt, ds = t - t.mean(1, keepdim=True), s - s.mean(1, keepdim=True)
    limit = ((dt - ds) ** 2).sum(1).mean() / (2 * 4)
    assert torch.allclose(parts["loss_clean"], limit, rtol=1e-2)


# --------------------------------------------------------------------------------------------
# pool, holdout, augmentation


def test_pool_eligible_and_append():
    pool = _pool(3, 4)
    assert pool.eligible(0).numel() == 0
    assert pool.eligible(1).tolist() == [0, 1, 2, 3]
    assert pool.eligible(2).tolist() == list(range(8))
    assert pool.eligible(99).numel() == 12
    bigger = pool.append(torch.zeros(2, 1, 16, 16), torch.tensor([3, 1]), 4)
    assert len(pool) == 12 and len(bigger) == 14  # append returns a new pool
    assert bigger.epoch[-2:].tolist() == [4, 4] and bigger.y[-2:].tolist() == [3, 1]
    assert bigger.eligible(3).numel() == 12 and bigger.eligible(4).numel() == 14
    with pytest.raises(ValueError):
        pool.append(torch.zeros(2, 3, 16, 16), torch.tensor([0, 1]), 4)
    with pytest.raises(ValueError):
        Pool(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long), torch.zeros(2, dtype=torch.long))


def test_holdout_is_never_trained_on_and_the_pool_stays_whole():
    """The holdout is extra images (the probe set), not pool images: every pool image stays eligible,
    and no training step ever sees a holdout image (the teacher records every batch it labels)."""
    pool = _pool(2, 16)
    pool.x.mul_(0.5)  # pool images in [0, 0.5]
    holdout = torch.full((4, 1, 16, 16), 0.9)  # bright: any pixel > 0.6 in a batch would come from it
    teacher = _Recorder(_teacher())
    _, _, state = _train(pool, cfg=replace(CFG, augment_pad=0), teacher=teacher, holdout=holdout, total_epochs=3,
                         warmup=1)
    assert [row["pool_size"] for row in state.log] == [32.0, 32.0]  # the whole pool, nothing held out
    training_calls = [c for c in teacher.calls]
    assert not any(training_calls[1:])  # the first call labels the holdout itself; no batch holds it
    assert all(math.isfinite(row["holdout_clean_acc"]) for row in state.log)
    _, _, without = _train(pool, cfg=replace(CFG, augment_pad=0), total_epochs=3, warmup=1)
    assert all(math.isnan(row["holdout_clean_acc"]) and math.isnan(row["holdout_pgd_acc"]) for row in without.log)


def test_augment_shift_and_flip():
    x = torch.rand(6, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(augment(x, 0, False, torch.Generator()), x)
    params = augment_params(6, 2, True, torch.Generator().manual_seed(0))
    out = apply_augment(x, 2, params)
    oy, ox, flips = params
    for i in range(6):
        ref = torch.nn.functional.pad(x[i:i + 1], (2, 2, 2, 2), mode="reflect")[0, :, oy[i]:oy[i] + 8, ox[i]:ox[i] + 8]
        ref = ref.flip(2) if flips[i] else ref
        assert torch.equal(out[i], ref)
    assert torch.equal(augment(x, 2, True, torch.Generator().manual_seed(0)), out)


# --------------------------------------------------------------------------------------------
# the training loop


class _Recorder(nn.Module):
    """A teacher wrapper that records, per call, whether any input pixel exceeds 0.6."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.calls: list[bool] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls.append(bool((x > 0.6).any()))
        return self.inner(x)


@pytest.mark.parametrize("mode", ["mixup", "cutmix"])
def test_mix_batch_mixes_the_first_fraction_with_batch_partners(mode):
    x = torch.rand(10, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    cfg = DistillConfig(mix=mode, mix_fraction=0.6)
    out = mix_batch(x, cfg, torch.Generator().manual_seed(0))
    assert out.shape == x.shape and torch.equal(out[6:], x[6:])  # 6 of 10 mixed, the rest untouched
    assert not torch.equal(out[:6], x[:6])
    again = mix_batch(x, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)  # the generator decides everything
    for i in range(6):
        if mode == "mixup":  # a convex combination of x_i and one partner of the batch
            fits = [j for j in range(10) for lam in [((out[i] - x[j]).flatten() @ (x[i] - x[j]).flatten()
                                                      / (x[i] - x[j]).pow(2).sum().clamp_min(1e-12))]
                    if 0 <= lam <= 1 and torch.allclose(out[i], lam * x[i] + (1 - lam) * x[j], atol=1e-5)]
            assert fits
        else:  # every pixel from x_i or from one partner, the partner's pixels form one box
            from_self = out[i] == x[i]
            partners = [j for j in range(10) if torch.equal(torch.where(from_self, x[i], x[j]), out[i])]
            assert partners
            moved = (~from_self[0]).nonzero()
            if len(moved):
                r0, c0 = moved.min(0).values.tolist()
                r1, c1 = moved.max(0).values.tolist()
                assert int((~from_self[0]).sum()) == (r1 - r0 + 1) * (c1 - c0 + 1)
    assert torch.equal(mix_batch(x, DistillConfig(mix=mode, mix_fraction=0.0), torch.Generator()), x)


def test_staged_pool_grows_with_epochs_and_lr_schedule():
    pool = _pool(3, 16)
    pool.x[:32] *= 0.5  # epochs 1-2 in [0, 0.5]; epoch 3 is bright: any pixel > 0.6 comes from it
    pool.x[32:] = 0.9
    teacher = _Recorder(_teacher())
    per_epoch = []
    cfg = CFG
    _, _, state = _train(pool, cfg=cfg, teacher=teacher, total_epochs=4, warmup=1,
                         on_epoch_end=lambda s: per_epoch.append(list(teacher.calls)))
    # student epochs 1, 2 (global 2, 3) see epochs <= 2 only; student epoch 3 (global 4) sees everything
    assert [row["epoch"] for row in state.log] == [2.0, 3.0, 4.0]
    assert [row["pool_size"] for row in state.log] == [32.0, 48.0, 48.0]
    assert not any(per_epoch[0]) and len(per_epoch[0]) == cfg.steps
    assert any(per_epoch[1][cfg.steps:])
    # cosine schedule stepped during the warm-up: the student starts at the lr after `warmup` steps
    lrs = [row["lr"] for row in state.log]
    for k, lr in enumerate(lrs, start=1):
        assert lr == pytest.approx(cfg.lr * (1 + math.cos(math.pi * k / 4)) / 2, rel=1e-6)


def test_without_pool_growth_every_epoch_trains_on_the_whole_pool():
    pool = _pool(3, 16)
    pool.x[:32] *= 0.5  # as above: a pixel > 0.6 can only come from synthesis epoch 3
    pool.x[32:] = 0.9
    teacher = _Recorder(_teacher())
    per_epoch = []
    cfg = replace(CFG, pool_growth=False)
    _, _, state = _train(pool, cfg=cfg, teacher=teacher, total_epochs=4, warmup=1,
                         on_epoch_end=lambda s: per_epoch.append(list(teacher.calls)))
    assert [row["pool_size"] for row in state.log] == [48.0, 48.0, 48.0]
    assert any(per_epoch[0][:cfg.steps])  # epoch 3's images already in the first student epoch
    with pytest.raises(ConfigError, match="pool_growth"):
        DistillConfig(schedule="interleaved", pool_growth=False)


def test_train_student_deterministic_teacher_frozen_and_log_complete():
    teacher = _teacher()
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student, teacher, state = _train(teacher=teacher, holdout=HOLDOUT)
    assert not teacher.training and all(p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():  # parameters and BN buffers bit-identical
        assert torch.equal(v, before[k]), k
    assert not student.training
    assert state.epoch == 2 and len(state.log) == 2
    for row in state.log:
        assert tuple(row) == LOG_COLUMNS
        assert all(isinstance(v, float) and math.isfinite(v) for v in row.values())
        assert 0.0 <= row["holdout_pgd_acc"] <= row["holdout_clean_acc"] + 0.5 and row["holdout_clean_acc"] <= 1.0
        assert 0.0 <= row["train_agreement"] <= 1.0
    for k, v in student.state_dict().items():
        assert torch.equal(state.student[k], v)
    student2, _, state2 = _train(holdout=HOLDOUT)
    for k, v in student.state_dict().items():
        assert torch.equal(student2.state_dict()[k], v), k
    assert state2.log == state.log
    student3, _, _ = _train(seed=1)
    assert any(not torch.equal(student3.state_dict()[k], v) for k, v in student.state_dict().items())


def test_resume_from_a_snapshot_gives_the_same_student():
    snaps = []
    full, _, final = _train(on_epoch_end=snaps.append)
    assert [s.epoch for s in snaps] == [1, 2]
    resumed_student = _net(7)  # any initial weights: the state overrides them
    resumed, _, state = _train(student=resumed_student, state=snaps[0])
    for k, v in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    assert state.log == final.log


def test_update_average_lerps_floats_and_copies_counts():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    averaged = copy.deepcopy(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
        model[1].running_mean.fill_(4.0)
        model[1].num_batches_tracked.fill_(7)
    before = {k: v.clone() for k, v in averaged.state_dict().items()}
    update_average(averaged, model, 0.75)
    for k, v in averaged.state_dict().items():
        if v.is_floating_point():  # 0.75 x old + 0.25 x new
            assert torch.allclose(v, 0.75 * before[k] + 0.25 * model.state_dict()[k]), k
    assert int(averaged[1].num_batches_tracked) == 7
    assert torch.allclose(averaged[1].running_mean, torch.full((2,), 0.75 * 0.0 + 0.25 * 4.0))
    # the TensorFlow warm-up: 0.1, 2/11, ... until the configured decay caps it
    assert average_decay(0.99, 0) == pytest.approx(0.1)
    assert average_decay(0.99, 1) == pytest.approx(2 / 11)
    assert average_decay(0.99, 10_000) == 0.99


def test_ema_saves_the_average_not_the_last_iterate_and_resumes_bit_for_bit():
    cfg = replace(CFG, ema=0.9)
    plain, _, plain_state = _train(holdout=HOLDOUT)
    snaps = []
    averaged, _, state = _train(cfg=cfg, holdout=HOLDOUT, on_epoch_end=snaps.append)
    # the trained iterate is the one without averaging (the average never feeds training) ...
    for k, v in plain_state.student.items():
        assert torch.equal(state.student[k], v), k
    # ... and the returned student is the average, which differs from it
    for k, v in averaged.state_dict().items():
        assert torch.equal(state.ema[k], v), k
    assert any(not torch.equal(state.ema[k], v) for k, v in state.student.items() if v.is_floating_point())
    with torch.no_grad():  # the holdout curve is the saved (averaged) model's
        agree = (averaged(HOLDOUT).argmax(1) == _teacher()(HOLDOUT).argmax(1)).float().mean()
    assert state.log[-1]["holdout_clean_acc"] == pytest.approx(float(agree))
    assert all(math.isfinite(row["holdout_clean_acc"]) for row in state.log)
    resumed, _, again = _train(cfg=cfg, holdout=HOLDOUT, student=_net(7), state=snaps[0])
    for k, v in averaged.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    assert again.log == state.log
    with pytest.raises(ValueError, match="no weight average"):
        _train(cfg=cfg, state=_train(on_epoch_end=None)[2])  # a state made without the average


def test_interleaved_synthesize_called_each_epoch_and_pool_grows():
    pool = _pool(1, 16)  # the warm-up pool only
    calls = []
    student = _net(1)

    def synthesize(epoch, model):
        calls.append((epoch, model is student, model.training))
        g = torch.Generator().manual_seed(epoch)
        return torch.rand(8, 1, 16, 16, generator=g), torch.arange(8) % 4

    _, _, state = _train(pool, cfg=replace(CFG, schedule="interleaved"), student=student,
                         synthesize=synthesize, total_epochs=4, warmup=1)
    assert calls == [(2, True, False), (3, True, False), (4, True, False)]
    assert len(state.pool) == 16 + 3 * 8
    assert state.pool.epoch.tolist() == [1] * 16 + [2] * 8 + [3] * 8 + [4] * 8
    assert [row["pool_size"] for row in state.log] == [24.0, 32.0, 40.0]


def test_cached_init_starts_from_the_cached_perturbation(monkeypatch):
    pool = _pool(2, 16)
    pool.x.mul_(0.6).add_(0.2)  # in [0.2, 0.8]: x + delta needs no clamping
    delta = torch.full_like(pool.x, EPS / 2)
    seen = []
    import ferd.adversaries as adversaries

    real = adversaries.craft_utae

    def spy(model, x_f, target, **kw):
        out = real(model, x_f, target, **kw)
        seen.append((x_f, kw["start"], kw["steps"], out))
        return out

    monkeypatch.setattr(adversaries, "craft_utae", spy)
    cfg = replace(CFG, utae_init="cached", cached_steps=2, augment_pad=2)
    _train(pool, cfg=cfg, cached_delta=delta, total_epochs=2, warmup=1)
    assert len(seen) == cfg.steps
    for x_f, start, steps, x_u in seen:
        assert steps == 2
        diff = start - x_f  # the same shift for x and x + delta gives exactly delta (other shifts: |x_i - x_j|)
        assert (diff - EPS / 2).abs().max() < 1e-6
        assert (x_u - x_f).abs().max() <= EPS + 1e-6 and x_u.min() >= 0 and x_u.max() <= 1
    with pytest.raises(FerdError, match="cached"):
        _train(pool, cfg=cfg, total_epochs=2, warmup=1)
    with pytest.raises(FerdError, match="shape"):
        _train(pool, cfg=cfg, cached_delta=delta[:3], total_epochs=2, warmup=1)


def test_non_finite_loss_names_epoch_step_and_term():
    pool = _pool(2, 16)
    pool.x[:] = float("nan")
    with pytest.raises(FerdError, match=r"non-finite loss_clean .* epoch 2, step 1"):
        _train(pool, cfg=CFG, total_epochs=2, warmup=1)


class _Sharpen(nn.Module):
    """A random teacher with 10x logits: confident, varied predictions the student can learn."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 10.0 * self.inner(x)


def test_student_learns_the_teacher():
    pool = _pool(2, 32, seed=3)
    cfg = replace(CFG, steps=8, batch_size=32, lr=0.05, augment_pad=0)
    _, _, state = _train(pool, cfg=cfg, teacher=_Sharpen(_teacher()), utae=UtaeConfig(steps=1), total_epochs=4, warmup=0)
    first, last = state.log[0], state.log[-1]
    assert last["loss"] < 0.5 * first["loss"], state.log  # measured: about 0.15x
    assert last["train_agreement"] >= first["train_agreement"] + 0.15, state.log  # measured: 0.48 -> 0.82..0.88


# --------------------------------------------------------------------------------------------
# the boundary term (distill.boundary: hee, beyond the paper)


def test_student_loss_boundary_term_by_hand_and_zero_without_it():
    g = torch.Generator().manual_seed(4)
    t, s, a, th, sh_ = (torch.randn(6, 4, generator=g) for _ in range(5))
    cfg = DistillConfig(boundary="hee", lambda_boundary=0.7)
    base, parts0 = student_loss(t, s, a, cfg)
    assert float(parts0["loss_boundary"]) == 0.0
    loss, parts = student_loss(t, s, a, cfg, boundary=(th[:3], sh_[:3]))
    assert torch.allclose(parts["loss_boundary"], kl_div(th[:3], sh_[:3]), atol=1e-6)  # labelled by T(x_H)
    assert torch.allclose(loss, base + 0.7 * kl_div(th[:3], sh_[:3]), atol=1e-6)
    s_h = sh_[:3].clone().requires_grad_(True)
    loss, _ = student_loss(t, s, a, cfg, boundary=(th[:3].requires_grad_(True), s_h))
    loss.backward()
    assert s_h.grad is not None and th.grad is None


def test_boundary_config_is_checked():
    with pytest.raises(Exception, match="distill.boundary"):
        DistillConfig(adversary="hee", boundary="hee")


@pytest.mark.parametrize("fraction, rows", [(0.5, 8), (1.0, 16), (0.01, 1)])
def test_boundary_term_labels_high_entropy_examples_of_the_first_rows(fraction, rows):
    """Each step the teacher labels the batch, then ``rows`` HEEs of its first rows: images moved
    by at most boundary_steps x boundary_step_size x eps in L-inf, clipped to [0, 1], and no longer the batch images."""
    cfg = replace(CFG, boundary="hee", boundary_fraction=fraction, boundary_steps=3, boundary_step_size=0.2,
                  hee_steps=7, hee_step_size=0.5)  # the adversary's HEE keys do not apply to the boundary term
    teacher = _Keeper(_teacher())
    _, _, state = _train(cfg=cfg, teacher=teacher, total_epochs=2, warmup=1)
    calls = teacher.inputs
    assert len(calls) == 2 * cfg.steps  # per step: x_F, then x_H (UTAE targets reuse T(x_F))
    for x_f, x_h in zip(calls[0::2], calls[1::2], strict=True):
        assert x_f.shape[0] == 16 and x_h.shape[0] == rows
        step = (x_h - x_f[:rows]).abs().amax()
        assert 0 < step <= 3 * 0.2 * EPS + 1e-6 and x_h.min() >= 0 and x_h.max() <= 1
    assert all(row["loss_boundary"] > 0 for row in state.log)


def test_boundary_off_is_the_plain_student_and_on_changes_it():
    plain, _, s0 = _train(total_epochs=2)
    assert all(row["loss_boundary"] == 0.0 for row in s0.log)
    zero_weight, _, _ = _train(cfg=replace(CFG, boundary="hee", lambda_boundary=0.0), total_epochs=2)
    on, _, _ = _train(cfg=replace(CFG, boundary="hee"), total_epochs=2)
    on2, _, _ = _train(cfg=replace(CFG, boundary="hee"), total_epochs=2)
    for k, v in plain.state_dict().items():
        assert torch.equal(zero_weight.state_dict()[k], v), k  # weight 0: no HEE is crafted, nothing changes
        assert torch.equal(on2.state_dict()[k], on.state_dict()[k]), k  # deterministic
    assert any(not torch.equal(on.state_dict()[k], v) for k, v in plain.state_dict().items())


def test_boundary_from_epoch_leaves_the_earlier_epochs_plain():
    """``boundary_from_epoch`` 2: epoch 1 crafts no HEE (the teacher labels x_F only) and logs 0, epoch 2 has the term."""
    cfg = replace(CFG, boundary="hee", boundary_from_epoch=2, boundary_steps=2)
    teacher = _Keeper(_teacher())
    _, _, state = _train(cfg=cfg, teacher=teacher, total_epochs=3, warmup=1)  # two distillation epochs
    assert len(teacher.inputs) == cfg.steps + 2 * cfg.steps
    assert [row["loss_boundary"] > 0 for row in state.log] == [False, True]
    with pytest.raises(FerdError, match="distill.boundary_from_epoch 3 is after the last distillation epoch"):
        _train(cfg=replace(cfg, boundary_from_epoch=3), total_epochs=3, warmup=1)


@pytest.mark.parametrize("kind", ["hee_teacher", "disagree", "hee+disagree"])
def test_boundary_kinds_that_ask_the_teacher_craft_through_it(kind):
    """``hee_teacher``, ``disagree`` (and ``hee+disagree`` on its second half) climb an objective of the
    teacher's output: per step the teacher sees x_F, then one input per ascent step (boundary_steps),
    then labels x_H; the student changes, deterministically."""
    cfg = replace(CFG, boundary=kind, boundary_steps=2, boundary_step_size=0.2)
    teacher = _Keeper(_teacher())
    on, _, state = _train(cfg=cfg, teacher=teacher, total_epochs=2, warmup=1)
    assert len(teacher.inputs) == cfg.steps * (1 + 2 + 1)
    first = teacher.inputs[:4]
    rows = first[3].shape[0]
    start = rows // 2 if kind == "hee+disagree" else 0  # the student HEEs of the first half ask no teacher
    assert torch.equal(first[1], first[0][start:rows])  # the ascent starts at x_F
    step = (first[3] - first[0][:rows]).abs().amax()
    assert 0 < step <= 2 * 0.2 * EPS + 1e-6
    assert all(row["loss_boundary"] > 0 for row in state.log)
    again, _, _ = _train(cfg=cfg, total_epochs=2, warmup=1)
    plain, _, _ = _train(total_epochs=2, warmup=1)
    for k, v in on.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    assert any(not torch.equal(on.state_dict()[k], v) for k, v in plain.state_dict().items())


class _Keeper(nn.Module):
    """A teacher wrapper that keeps a copy of every input it labels."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return self.inner(x)
