"""Per-class metrics on hand-made numbers, and the sanity checks on attack/eps orderings."""

from __future__ import annotations

import math

import pytest
import torch

from ferd.metrics import Summary, check_monotone, check_ordering, per_class_accuracy, summarize


def test_per_class_accuracy():
    y = torch.tensor([0, 0, 1, 1, 1, 2, 2, 2, 2, 3])
    pred = torch.tensor([0, 1, 1, 1, 0, 2, 0, 0, 0, 3])
    acc = per_class_accuracy(pred, y, 4)
    assert acc.dtype == torch.float64
    assert acc.tolist() == pytest.approx([0.5, 2 / 3, 0.25, 1.0])


def test_per_class_accuracy_rejects_empty_class_and_bad_input():
    y = torch.tensor([0, 0, 2])
    with pytest.raises(ValueError, match=r"no samples \(1, 3\)"):
        per_class_accuracy(y, y, 4)
    with pytest.raises(ValueError, match="labels must be in"):
        per_class_accuracy(torch.tensor([0, 5]), torch.tensor([0, 5]), 4)
    with pytest.raises(ValueError, match="equal length"):
        per_class_accuracy(torch.tensor([0]), torch.tensor([0, 1]), 2)


def test_summarize_ten_classes():
    acc = [0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.5]
    s = summarize(torch.tensor(acc, dtype=torch.float64))
    mean = sum(acc) / 10
    std = math.sqrt(sum((a - mean) ** 2 for a in acc) / 10)  # population std
    assert isinstance(s, Summary)
    assert s.avg == pytest.approx(mean)
    assert s.worst == pytest.approx(0.1) and s.worst_class == 8
    assert s.worst10 is None
    assert s.nsd == pytest.approx(std / mean)
    # the overall (sample-weighted) accuracy, when given, is the headline average
    assert summarize(acc, overall=0.42).avg == 0.42


def test_summarize_hundred_classes_worst10():
    acc = torch.full((100,), 0.6, dtype=torch.float64)
    lows = [0.0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45]
    acc[torch.arange(10) * 7 + 3] = torch.tensor(lows, dtype=torch.float64)
    s = summarize(acc)
    assert s.worst10 == pytest.approx(sum(lows) / 10)
    assert s.worst == 0.0 and s.worst_class == 3
    assert s.avg == pytest.approx((90 * 0.6 + sum(lows)) / 100)
    # ceil(0.1 * C): 101 classes -> the 11 lowest
    acc101 = torch.cat([acc, torch.tensor([0.5], dtype=torch.float64)])
    assert summarize(acc101).worst10 == pytest.approx((sum(lows) + 0.5) / 11)


def test_summarize_ties_and_degenerate():
    s = summarize([0.5, 0.2, 0.2, 0.9])
    assert s.worst_class == 1  # first of the tied classes
    flat = summarize([0.7, 0.7, 0.7])
    assert flat.nsd == pytest.approx(0.0, abs=1e-12)
    zero = summarize([0.0, 0.0])
    assert math.isnan(zero.nsd) and zero.worst == 0.0
    with pytest.raises(ValueError):
        summarize([0.5, float("nan")])
    with pytest.raises(ValueError):
        summarize([])
    with pytest.raises(ValueError):
        summarize([0.5], overall=1.5)


def test_check_ordering():
    good = {"clean": 0.9, "fgsm": 0.6, "pgd": 0.5, "cw": 0.48, "autoattack": 0.45}
    assert check_ordering(good) == []
    assert check_ordering({**good, "pgd": 0.605}) == []  # within tol
    warnings = check_ordering({**good, "pgd": 0.7})
    assert len(warnings) == 1 and "fgsm" in warnings[0] and "pgd" in warnings[0]
    assert "gradient masking" in warnings[0]
    warnings = check_ordering({**good, "autoattack": 0.55})
    assert len(warnings) == 2  # above both pgd and cw
    assert any("cw" in w for w in warnings) and all("autoattack" in w for w in warnings)
    assert len(check_ordering({"clean": 0.5, "fgsm": 0.6})) == 1
    assert check_ordering({"pgd": 0.5}) == []  # missing attacks are skipped
    assert check_ordering({"clean": 0.5, "fgsm": 0.54}, tol=0.05) == []


def test_check_monotone():
    assert check_monotone({0.05: 0.6, 0.1: 0.4, 0.2: 0.1}) == []
    assert check_monotone({0.2: 0.1, 0.05: 0.6, 0.1: 0.4}) == []  # order of keys does not matter
    assert check_monotone({0.05: 0.4, 0.1: 0.405}) == []  # within tol
    warnings = check_monotone({0.05: 0.6, 0.1: 0.4, 0.2: 0.5})
    assert len(warnings) == 1 and "0.1" in warnings[0] and "0.2" in warnings[0]
    assert "gradient masking" in warnings[0]
