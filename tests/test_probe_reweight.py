"""Per-class fragility (§2.2), the teacher probe, the probe set, Spearman correlation, and the
class-proportion maps softmax / min-max / uniform with the running average of D."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ferd.config import FaeConfig, ReweightConfig
from ferd.probe import ProbeResult, fragility, probe_set, probe_teacher, rank_correlation
from ferd.reweight import class_proportions, smooth_fragility

C = 4
SHAPE = (1, 16, 16)


def tiny_teacher() -> nn.Module:
    from ferd.models import build_model

    torch.manual_seed(0)
    model = build_model("cnn", width=4, num_classes=C, in_channels=1, image_size=16)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.num_batches_tracked.fill_(3)
    return model


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# --------------------------------------------------------------------------------------------
# fragility


def test_fragility_hand_made():
    margins = torch.tensor([1.0, -3.0, 2.0, 0.5, -0.5, 4.0])
    y = torch.tensor([0, 0, 1, 1, 1, 3])
    D = fragility(margins, y, C)
    assert D.dtype == torch.float64 and D.shape == (C,)
    torch.testing.assert_close(D, torch.tensor([1.0, -2.0 / 3.0, 0.0, -4.0], dtype=torch.float64))  # class 2 empty -> 0
    agreed = torch.tensor([True, False, False, True, True, False])
    Da = fragility(margins, y, C, agreed=agreed)
    # class 0: only margin 1 counts; class 1: 0.5 and -0.5; class 3: nothing counted -> 0
    torch.testing.assert_close(Da, torch.tensor([-1.0, 0.0, 0.0, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError):
        fragility(margins, torch.tensor([0, 0, 1, 1, 1, 9]), C)


# --------------------------------------------------------------------------------------------
# probe_teacher


def test_probe_teacher_margins_consistent_and_teacher_untouched():
    teacher = tiny_teacher()
    teacher.train()
    before = snapshot(teacher)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, *SHAPE, generator=g)
    y = torch.arange(40) % C
    res = probe_teacher(teacher, x, y, C, eps=0.1, alpha=0.025, steps=3, mode="all",
                        generator=torch.Generator().manual_seed(1), batch_size=16)
    assert isinstance(res, ProbeResult)
    assert res.margins.shape == (40,) and res.clean_pred.dtype == torch.int64 and res.adv_pred.shape == (40,)
    assert res.D.dtype == torch.float64 and res.D.shape == (C,)
    # margin < 0 exactly when the adversarial prediction is wrong (ties have probability 0 here)
    assert torch.equal(res.margins < 0, res.adv_pred != y)
    torch.testing.assert_close(res.D, fragility(res.margins, y, C))
    for c in range(C):
        sel = y == c
        assert res.per_class_adv_acc[c].item() == pytest.approx((res.adv_pred[sel] == c).double().mean().item())
        assert res.per_class_agreement[c].item() == pytest.approx((res.clean_pred[sel] == c).double().mean().item())
    # the clean predictions are the eval-mode teacher's
    with torch.no_grad():
        assert torch.equal(res.clean_pred, teacher.eval()(x).argmax(1))
    teacher.train()
    # seeded, and the agreed mode restricts D
    again = probe_teacher(teacher, x, y, C, eps=0.1, alpha=0.025, steps=3, mode="agreed",
                          generator=torch.Generator().manual_seed(1), batch_size=16)
    assert torch.equal(again.margins, res.margins)
    torch.testing.assert_close(again.D, fragility(res.margins, y, C, agreed=res.clean_pred == y))
    # the teacher's parameters and BN buffers are bit-identical; flags restored
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(m.training for m in teacher.modules()) and all(p.requires_grad for p in teacher.parameters())


def test_probe_set_is_class_balanced_and_chunked():
    teacher = tiny_teacher()
    before = snapshot(teacher)
    cfg = FaeConfig(batch_size=6, steps=1, nz=8, ngf=4, ib_steps=1, augment_pad=1)
    calls = []
    x, y = probe_set(teacher, None, cfg, 3, C, image_shape=SHAPE, generator=torch.Generator().manual_seed(0),
                     device="cpu", progress=lambda task, d, t, info: calls.append(task))
    assert x.shape == (12, *SHAPE) and 0 <= x.min() and x.max() <= 1
    assert torch.equal(y, torch.arange(C).repeat_interleave(3))
    assert calls == ["probe set 1/2", "probe set 2/2"]
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


# --------------------------------------------------------------------------------------------
# rank correlation


def test_rank_correlation():
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert rank_correlation(torch.tensor([0.1, 5.0, 2.0]), torch.tensor([1.0, 100.0, 3.0])) == pytest.approx(1.0)
    # ties get average ranks: a -> (1.5, 1.5, 3, 4); Pearson of ranks with (1, 2, 3, 4)
    ra = torch.tensor([1.5, 1.5, 3.0, 4.0])
    rb = torch.tensor([1.0, 2.0, 3.0, 4.0])
    expected = float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])
    assert rank_correlation([7, 7, 8, 9], [1, 2, 3, 4]) == pytest.approx(expected)
    assert math.isnan(rank_correlation([1, 1, 1], [1, 2, 3]))


# --------------------------------------------------------------------------------------------
# reweighting


D_EX = torch.tensor([0.5, -1.0, 2.0, 0.0, 1.0], dtype=torch.float64)


@pytest.mark.parametrize("method", ["softmax", "minmax"])
def test_more_fragile_classes_get_more_weight(method):
    p = class_proportions(D_EX, ReweightConfig(method=method))
    assert p.dtype == torch.float64 and p.shape == D_EX.shape
    assert p.sum().item() == pytest.approx(1.0)
    order = torch.argsort(D_EX)
    assert bool((p[order].diff() > 0).all())  # strictly monotone in D


def test_softmax_values_and_temperature():
    p = class_proportions(D_EX, ReweightConfig(method="softmax", tau=1.0))
    torch.testing.assert_close(p, torch.softmax(D_EX, 0))
    p_hot = class_proportions(D_EX, ReweightConfig(method="softmax", tau=1e6))
    torch.testing.assert_close(p_hot, torch.full_like(D_EX, 0.2), atol=1e-5, rtol=0)
    p_cold = class_proportions(D_EX, ReweightConfig(method="softmax", tau=0.5))
    assert p_cold.max() > p.max()


def test_minmax_bounds_before_normalising():
    cfg = ReweightConfig(method="minmax", min_p=0.05, max_p=0.2)
    p = class_proportions(D_EX, cfg)
    raw = 0.05 + 0.15 * (D_EX - D_EX.min()) / (D_EX.max() - D_EX.min() + 1e-8)
    assert raw.min() == pytest.approx(0.05) and raw.max() == pytest.approx(0.2, abs=1e-8)
    torch.testing.assert_close(p, raw / raw.sum())
    # the ratio of the largest to the smallest proportion is bounded by max_p / min_p
    assert (p.max() / p.min()).item() <= 0.2 / 0.05 + 1e-9
    # constant D: every class at min_p, hence uniform after normalising
    torch.testing.assert_close(class_proportions(torch.ones(4), cfg), torch.full((4,), 0.25, dtype=torch.float64))


def test_uniform_and_invalid():
    p = class_proportions(D_EX, ReweightConfig(method="uniform"))
    torch.testing.assert_close(p, torch.full_like(D_EX, 0.2))
    with pytest.raises(ValueError):
        class_proportions(torch.tensor([1.0, float("nan")]), ReweightConfig())


def test_smooth_fragility():
    cur = torch.tensor([1.0, 2.0])
    torch.testing.assert_close(smooth_fragility(None, cur, 0.9), cur.double())
    torch.testing.assert_close(smooth_fragility(torch.tensor([3.0, 0.0]), cur, 0.0), cur.double())
    torch.testing.assert_close(smooth_fragility(torch.tensor([3.0, 0.0]), cur, 0.75),
                               torch.tensor([0.75 * 3 + 0.25 * 1, 0.25 * 2.0], dtype=torch.float64))
    with pytest.raises(ValueError):
        smooth_fragility(torch.zeros(3), cur, 0.5)
