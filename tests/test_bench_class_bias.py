"""benchmarks/class_bias.py: the fitted bias undoes a known per-class shift, and at the optimum the
biased student's mean prediction is the teacher's (the convex fit's first-order condition)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("class_bias")


def test_fit_bias_undoes_a_class_prior_shift(bench):
    gen = torch.Generator().manual_seed(0)
    teacher = 2.0 * torch.randn(400, 5, generator=gen)
    shift = torch.tensor([0.0, 1.5, -0.5, 0.3, 2.0])
    b = bench.fit_bias(teacher + shift, teacher)
    assert b.sum().abs() < 1e-5  # centred
    torch.testing.assert_close(b, -(shift - shift.mean()), atol=1e-4, rtol=0)


def test_fitted_bias_matches_the_mean_prediction(bench):
    gen = torch.Generator().manual_seed(1)
    teacher = torch.randn(300, 4, generator=gen)
    student = teacher.flip(1) + torch.randn(300, 4, generator=gen)  # not a shift: no b gives KL 0
    b = bench.fit_bias(student, teacher)
    torch.testing.assert_close(F.softmax(student + b, 1).mean(0), F.softmax(teacher, 1).mean(0), atol=1e-5, rtol=0)
    # and it is a minimum: moving b any way raises the loss
    def loss(bb):
        return F.kl_div(F.log_softmax(student + bb, 1), F.softmax(teacher, 1), reduction="batchmean")
    for d in torch.eye(4):
        assert loss(b + 0.05 * d) > loss(b) and loss(b - 0.05 * d) > loss(b)


def test_biased_model_and_counts(bench):
    model = torch.nn.Linear(3, 3, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.eye(3))
    biased = bench.Biased(model, torch.tensor([0.0, 0.0, 10.0]))
    x = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    assert bench.argmax_counts(model(x), 3) == [1, 1, 1]
    assert bench.argmax_counts(biased(x), 3) == [0, 0, 3]
    acc = bench.per_class_accuracy(biased(x).argmax(1), torch.tensor([0, 1, 2]), 3)
    assert acc.tolist() == [0.0, 0.0, 1.0]
