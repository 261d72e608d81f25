"""The reweighting signals (§2.2 and beyond): no starvation, the student signal, the oracle, and the
per-epoch rank correlation with the real-image diagnostic that metrics/synthesis.csv records."""

from __future__ import annotations

import csv
import math

import pytest
import torch
from torch import nn

from ferd.artifacts import load_h5, load_model
from ferd.config import FaeConfig, ProbeConfig, ReweightConfig
from ferd.probe import rank_correlation
from ferd.reweight import class_proportions, fill_absent, initial_fragility
from ferd.synthesis import ProbeData, SynthesisState, Synthesizer
from tests.conftest import tiny_params
from tests.test_stages import run_chain

C = 4


def test_an_absent_class_keeps_its_previous_fragility_and_a_floor():
    previous = torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64)
    now = torch.tensor([0.5, 0.0, 0.7, 0.2], dtype=torch.float64)  # class 1 had no sample: its 0 means nothing
    present = torch.tensor([True, False, True, True])
    filled = fill_absent(now, present, previous)
    assert filled.tolist() == [0.5, 2.0, 0.7, 0.2]
    # without a previous D: the mean of the present classes, not 0 (softmax of 0 against D > 0 starves it)
    first = fill_absent(now, present, None)
    assert first[1].item() == pytest.approx((0.5 + 0.7 + 0.2) / 3)
    # the floor: every class keeps at least floor / C of the pool, however far below the others its D is
    cfg = ReweightConfig(method="softmax", floor=0.4)
    p = class_proportions(torch.tensor([-30.0, 0.0, 5.0, 9.0], dtype=torch.float64), cfg)
    assert p.sum().item() == pytest.approx(1.0) and p.min().item() >= 0.4 / C - 1e-12
    assert p.argmax().item() == 3  # the order is kept
    assert class_proportions(torch.tensor([-30.0, 0.0, 5.0, 9.0]), ReweightConfig(method="softmax"))[0] < 1e-15


def test_initial_fragility_per_signal():
    arrays = {"D": [0.5, 1.0, -1.0, 2.0], "real_D": [3.0, 0.0, 1.0, 2.0]}
    assert initial_fragility(arrays, "teacher").tolist() == arrays["D"]
    assert initial_fragility(arrays, "oracle").tolist() == arrays["real_D"]
    zeros = initial_fragility(arrays, "student")  # no student yet: p uniform
    assert torch.allclose(class_proportions(zeros, ReweightConfig()), torch.full((4,), 0.25, dtype=torch.float64))
    from ferd.errors import ConfigError

    with pytest.raises(ConfigError, match="probe.real_split"):
        initial_fragility({"D": arrays["D"]}, "oracle")


class _FailsOneClass(nn.Module):
    """A 'student' that copies the teacher but never predicts class ``bad`` (its logit pushed down)."""

    def __init__(self, teacher: nn.Module, bad: int) -> None:
        super().__init__()
        self.teacher, self.bad = teacher, bad

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.teacher(x).clone()
        out[:, self.bad] = out[:, self.bad] - 20.0
        return out


@pytest.mark.parametrize("bad", [1, 3])
def test_the_student_signal_weights_the_class_the_student_fails(tiny_teacher, bad):
    teacher, _ = load_model(tiny_teacher)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(24, 1, 16, 16, generator=g)
    with torch.no_grad():
        t = teacher(x).argmax(1)
    t[:C] = torch.arange(C)  # every class has holdout images
    data = ProbeData(holdout_x=x, holdout_t=t)
    synth = Synthesizer(teacher, FaeConfig(), ProbeConfig(steps=3), ReweightConfig(signal="student", floor=0.2),
                        num_classes=C, image_shape=(1, 16, 16), eps=0.1, seed=0, device="cpu",
                        state=SynthesisState(p=torch.full((C,), 0.25, dtype=torch.float64)), probe_data=data)
    D, present, diagnostic = synth.signal(1, None, torch.zeros(0, dtype=torch.long), _FailsOneClass(teacher, bad))
    assert present.all() and diagnostic is None  # no real images given: no diagnostic
    assert D.argmax().item() == bad
    p = class_proportions(D, synth.reweight)
    assert p.argmax().item() == bad


def test_signals_that_need_what_is_missing_are_refused(tiny_teacher):
    from ferd.errors import ConfigError

    teacher, _ = load_model(tiny_teacher)
    kw = dict(num_classes=C, image_shape=(1, 16, 16), eps=0.1, seed=0, device="cpu",
              state=SynthesisState(p=torch.full((C,), 0.25, dtype=torch.float64)))
    with pytest.raises(ConfigError, match="probe.real_split"):
        Synthesizer(teacher, FaeConfig(), ProbeConfig(), ReweightConfig(signal="oracle"), **kw,
                    probe_data=ProbeData(holdout_x=torch.zeros(1, 1, 16, 16), holdout_t=torch.zeros(1, dtype=torch.long)))
    with pytest.raises(ConfigError, match="ferd probe"):
        Synthesizer(teacher, FaeConfig(), ProbeConfig(), ReweightConfig(signal="student"), **kw)


@pytest.mark.parametrize("signal", ["teacher", "student", "oracle"])
def test_synthesis_log_rank_correlation_is_spearman_of_the_signal_and_the_diagnostic(tmp_path, signal):
    """metrics/synthesis.csv's rank_corr, recomputed from what the run wrote: the D that drove p
    (pool D_history) against the real-image diagnostic (the teacher's real D; for the student signal
    the student's real D, which only the log has, so there only its range is checked)."""
    base = tiny_params()
    params = tiny_params(reweight={**base["reweight"], "signal": signal, "floor": 0.2},
                         fae={**base["fae"], "shadow_adv_steps": 1})
    root = tmp_path / signal
    run_chain(root, params)
    rows = list(csv.DictReader(open(root / "metrics/synthesis.csv")))
    pool, _ = load_h5(root / "data/fae/pool.h5", kind="pool")
    probe, _ = load_h5(root / "data/probe/probe.h5", kind="probe")
    assert len(rows) == len(pool["D_history"]) == base["fae"]["epochs"]
    for row, D in zip(rows, pool["D_history"], strict=True):
        corr = float(row["rank_corr"])
        if signal == "student":  # NaN when a side is constant (the untrained shadow of epoch 1 is)
            assert math.isnan(corr) or -1.0 <= corr <= 1.0
        else:
            expected = rank_correlation(torch.as_tensor(D), torch.as_tensor(probe["real_D"]))
            assert corr == pytest.approx(expected, abs=1e-5) or (math.isnan(corr) and math.isnan(expected))
        for c in ("class0", "class1", "class2", "class3"):
            agree = float(row[f"agree_{c}"])
            assert math.isnan(agree) or 0.0 <= agree <= 1.0
    if signal == "oracle":
        assert all(float(r["rank_corr"]) == pytest.approx(1.0) for r in rows)
