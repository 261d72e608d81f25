"""Method variants (ablations, baselines) and their student adversaries and losses (method reference §6.3, §8)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from ferd.adversaries import craft_adversary, craft_boundary, craft_hee, prediction_entropy
from ferd.config import DistillConfig, UtaeConfig, load_params
from ferd.errors import ConfigError
from ferd.losses import soft_label_loss
from ferd.models import build_model
from ferd.variants import SWITCHES, VARIANTS, set_flags, variant

ROOT = Path(__file__).resolve().parents[1]


def _resolved(name: str):
    """params.yaml with the variant's overrides applied, as `dvc exp run -S` would."""
    return load_params(ROOT / "params.yaml", variant(name).overrides)


def test_every_variant_sets_every_switch():
    for v in VARIANTS.values():
        assert tuple(v.overrides) == SWITCHES, v.name


@pytest.mark.parametrize(
    ("name", "method", "lambda_uni", "gamma", "adversary", "loss", "boundary"),
    [
        ("ferd", "softmax", 5.0, 0.3, "utae", "kl", "hee+disagree"),
        ("no-reweight", "uniform", 5.0, 0.3, "utae", "kl", "hee+disagree"),
        ("no-fae-uni", "softmax", 0.0, 0.3, "utae", "kl", "hee+disagree"),
        ("no-utae-gamma", "softmax", 5.0, 0.0, "utae", "kl", "hee+disagree"),
        ("plain", "uniform", 0.0, 0.0, "utae", "kl", "hee+disagree"),
        ("dfhl", "uniform", 0.0, 0.0, "hee", "ce_hard", "none"),  # the published baselines: no boundary term
        ("dfkd-rslad", "uniform", 0.0, 0.0, "pgd", "kl", "none"),
    ],
)
def test_variant_resolves_to_the_intended_configuration(name, method, lambda_uni, gamma, adversary, loss, boundary):
    p = _resolved(name)
    assert (p.reweight.method, p.fae.lambda_uni, p.utae.gamma, p.distill.adversary, p.distill.loss,
            p.distill.boundary) == (method, lambda_uni, gamma, adversary, loss, boundary)
    # everything else is the shared setting: the RSLAD weights 5/6, 1/6 and the budget
    assert p.distill.lambda_clean == pytest.approx(5 / 6, abs=1e-6)
    assert p.distill.lambda_adv == pytest.approx(1 / 6, abs=1e-6)
    assert p.fae.epochs == load_params(ROOT / "params.yaml").fae.epochs


def test_variant_independent_of_what_params_held_before():
    """A variant applied over another variant's params gives the same configuration (workspace runs)."""
    for name, v in VARIANTS.items():
        over_plain = load_params(ROOT / "params.yaml", {**VARIANTS["dfhl"].overrides, **v.overrides})
        assert over_plain == _resolved(name)


def test_explicit_override_wins_and_flags_format():
    p = load_params(ROOT / "params.yaml", {**variant("ferd").overrides, "utae.gamma": 0.5})
    assert p.utae.gamma == 0.5
    assert set_flags({"utae.gamma": 0.0, "distill.loss": "kl", "x": True}) == [
        "-S", "utae.gamma=0.0", "-S", "distill.loss=kl", "-S", "x=true"]


def test_unknown_variant_lists_the_valid_ones():
    with pytest.raises(ConfigError, match="dfhl"):
        variant("dfhl-typo")


def test_cached_utae_init_needs_the_utae_adversary():
    with pytest.raises(ConfigError, match="utae_init"):
        DistillConfig(utae_init="cached", adversary="pgd")


# --------------------------------------------------------------------------------------------
# adversaries and losses


def _student():
    torch.manual_seed(0)
    return build_model("cnn", width=4, num_classes=4, in_channels=1, image_size=16).eval()


def test_hee_raises_entropy_leaves_the_ball_and_stays_in_range():
    net = _student()
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    x_h = craft_hee(net, x, steps=10, step_size=0.03)
    with torch.no_grad():
        assert prediction_entropy(net(x_h)).mean() > prediction_entropy(net(x)).mean()
    assert 0.0 <= float(x_h.min()) and float(x_h.max()) <= 1.0
    assert float((x_h - x).abs().max()) > 0.1  # DFHL: no eps-ball (10 x 0.03 can reach 0.3)
    assert not net.training


def _kl(t_logits, s_logits):
    log_t, log_s = F.log_softmax(t_logits, 1), F.log_softmax(s_logits, 1)
    return (log_t.exp() * (log_t - log_s)).sum(1)


def test_boundary_hee_teacher_climbs_the_teachers_entropy_whatever_the_student():
    teacher = _student().train()
    torch.manual_seed(5)
    s1 = build_model("cnn", width=4, num_classes=4, in_channels=1, image_size=16)
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    x_h = craft_boundary("hee_teacher", s1, teacher, x, steps=3, step_size=0.02)
    assert teacher.training  # frozen in eval mode for the ascent, then restored
    assert torch.equal(x_h, craft_boundary("hee_teacher", _student(), teacher, x, steps=3, step_size=0.02))
    teacher.eval()
    with torch.no_grad():
        assert prediction_entropy(teacher(x_h)).mean() > prediction_entropy(teacher(x)).mean()
    assert 0 < float((x_h - x).abs().max()) <= 3 * 0.02 + 1e-6


def test_boundary_disagree_climbs_the_teacher_student_kl_and_rests_where_they_agree():
    teacher = _student()
    torch.manual_seed(5)
    student = build_model("cnn", width=4, num_classes=4, in_channels=1, image_size=16).eval()
    x = torch.rand(8, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    x_h = craft_boundary("disagree", student, teacher, x, steps=3, step_size=0.02)
    with torch.no_grad():
        assert _kl(teacher(x_h), student(x_h)).mean() > _kl(teacher(x), student(x)).mean()
    assert 0 < float((x_h - x).abs().max()) <= 3 * 0.02 + 1e-6
    # a student identical to the teacher has nothing to disagree on: a zero gradient, no move
    assert torch.equal(craft_boundary("disagree", _student(), teacher, x, steps=3, step_size=0.02), x)


def test_boundary_hee_plus_disagree_splits_the_global_rows_in_halves():
    teacher = _student()
    torch.manual_seed(5)
    student = build_model("cnn", width=4, num_classes=4, in_channels=1, image_size=16).eval()
    x = torch.rand(10, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    kw = dict(steps=3, step_size=0.02)
    both = craft_boundary("hee+disagree", student, teacher, x, **kw)
    assert torch.allclose(both[:5], craft_boundary("hee", student, teacher, x[:5], **kw), atol=1e-6)
    assert torch.allclose(both[5:], craft_boundary("disagree", student, teacher, x[5:], **kw), atol=1e-6)
    # data-parallel ranks holding rows 0:3, 3:7, 7:10 of the global boundary batch split it as one process
    ranks = [craft_boundary("hee+disagree", student, teacher, x[a:b], global_rows=(a, 10), **kw)
             for a, b in ((0, 3), (3, 7), (7, 10))]
    assert torch.allclose(torch.cat(ranks), both, atol=1e-6)
    # distill.boundary_hee_share: the first floor(share x rows) rows are hee, the rest disagree
    quarter = craft_boundary("hee+disagree", student, teacher, x, hee_share=0.25, **kw)
    assert torch.allclose(quarter[:2], craft_boundary("hee", student, teacher, x[:2], **kw), atol=1e-6)
    assert torch.allclose(quarter[2:], craft_boundary("disagree", student, teacher, x[2:], **kw), atol=1e-6)
    ranks = [craft_boundary("hee+disagree", student, teacher, x[a:b], global_rows=(a, 10), hee_share=0.25, **kw)
             for a, b in ((0, 1), (1, 6), (6, 10))]
    assert torch.allclose(torch.cat(ranks), quarter, atol=1e-6)
    with pytest.raises(ValueError, match="hee_share"):
        craft_boundary("hee+disagree", student, teacher, x, hee_share=1.0, **kw)


def test_boundary_kinds_are_checked():
    net = _student()
    with pytest.raises(ValueError, match="unknown kind 'pgd'"):
        craft_boundary("pgd", net, net, torch.rand(2, 1, 16, 16), steps=1, step_size=0.1)
    with pytest.raises(ConfigError, match="distill.boundary"):
        DistillConfig(adversary="hee", boundary="hee")  # the same HEEs twice
    assert DistillConfig(adversary="hee", boundary="disagree").boundary == "disagree"


def test_pgd_adversary_stays_in_the_ball_and_raises_the_loss_on_teacher_labels():
    net = _student()
    x = torch.rand(32, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        t = net(x)  # the "teacher" is the student itself: clean accuracy 1
    cfg = DistillConfig(adversary="pgd")
    x_a = craft_adversary(net, x, t, cfg, UtaeConfig(steps=10, step_size=0.25), eps=0.1,
                          generator=torch.Generator().manual_seed(0))
    assert float((x_a - x).abs().max()) <= 0.1 + 1e-6
    with torch.no_grad():
        y = t.argmax(1)
        assert F.cross_entropy(net(x_a), y) > F.cross_entropy(net(x), y)


def test_cached_start_only_for_utae():
    net = _student()
    x = torch.rand(4, 1, 16, 16)
    with pytest.raises(ValueError, match="utae"):
        craft_adversary(net, x, net(x).detach(), DistillConfig(adversary="hee"), UtaeConfig(), eps=0.1,
                        generator=None, start=x)


def test_hard_label_ce_is_ce_on_the_teacher_argmax():
    t = torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 3.0]])
    s = torch.tensor([[0.5, 0.2, 0.1], [0.3, 0.1, 0.2]])
    assert soft_label_loss("ce_hard", t, s) == pytest.approx(float(F.cross_entropy(s, torch.tensor([0, 2]))))


def test_train_student_runs_every_adversary_and_loss():
    from tests.test_distill import _train

    for cfg in (
        replace(DistillConfig(steps=2, batch_size=8), adversary="hee", loss="ce_hard"),
        replace(DistillConfig(steps=2, batch_size=8), adversary="pgd"),
    ):
        _s, _t, state = _train(cfg=cfg)
        assert state.epoch == 2 and all(torch.isfinite(torch.tensor(row["loss"])) for row in state.log)
