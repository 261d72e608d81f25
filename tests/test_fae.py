"""FAE synthesis (§2.1, §2.3): augmentation, L_bn hooks, IB fit and robust mask, uniformity loss,
one generator epoch (shapes, labels, determinism, frozen teacher, NaN detection)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ferd.augment import augment
from ferd.config import FaeConfig
from ferd.errors import FerdError
from ferd.fae import (
    BNStatsLoss,
    EpochSynthesis,
    channel_variance,
    ib_fit,
    robust_mask,
    synthesize_epoch,
    uniformity_loss,
)
from ferd.models import build_model

C = 4
SHAPE = (1, 16, 16)
LOG_KEYS = {"step", "total", "bn", "adv", "oh", "uni", "tv", "l2", "teacher_acc", "robust_channels"}


def tiny_cnn(seed: int, width: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    model = build_model("cnn", width=width, num_classes=C, in_channels=1, image_size=16)
    # non-trivial BN statistics, as in a trained teacher
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.num_batches_tracked.fill_(7)
    return model


def tiny_cfg(**kw) -> FaeConfig:
    base = dict(batch_size=8, steps=3, nz=16, ngf=8, ib_steps=2, augment_pad=2)
    base.update(kw)
    return FaeConfig(**base)


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def hook_count(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


# --------------------------------------------------------------------------------------------
# augment


def test_augment_shift_flip_deterministic_and_differentiable():
    x = torch.rand(6, 2, 8, 8, requires_grad=True)
    a1 = augment(x, 2, True, torch.Generator().manual_seed(1))
    a2 = augment(x, 2, True, torch.Generator().manual_seed(1))
    assert a1.shape == x.shape
    assert torch.equal(a1, a2)
    a1.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    assert augment(x, 0, False, torch.Generator()) is x


def test_augment_is_a_shift():
    # every output is a crop of the reflect-padded x at an offset (dy, dx) in [0, 2 pad]
    x = torch.rand(16, 1, 8, 8)
    out = augment(x, 1, False, torch.Generator().manual_seed(0))
    xp = F.pad(x, (1, 1, 1, 1), mode="reflect")
    offsets = set()
    for b in range(x.shape[0]):
        found = [(r, c) for r in range(3) for c in range(3) if torch.equal(out[b], xp[b, :, r:r + 8, c:c + 8])]
        assert found
        offsets.add(found[0])
    assert len(offsets) > 1  # per-sample offsets


# --------------------------------------------------------------------------------------------
# L_bn


def test_bn_stats_loss_value_and_hooks_removed():
    model = tiny_cnn(0)
    model.eval()
    x = torch.rand(5, *SHAPE)
    inputs = {}
    handles = [m.register_forward_hook(lambda mod, i, o, name=n: inputs.__setitem__(name, i[0]))
               for n, m in model.named_modules() if isinstance(m, nn.BatchNorm2d)]
    before = hook_count(model)
    with BNStatsLoss(model) as bn:
        assert bn.num_layers == 4
        assert hook_count(model) == before + 4
        model(x)
        value = bn.collect()
        bn.enabled = False
        model(x)
        assert bn.collect() is None
    for h in handles:
        h.remove()
    assert hook_count(model) == 0
    expected = 0.0
    for name, a in inputs.items():
        m = dict(model.named_modules())[name]
        expected += (a.mean(dim=(0, 2, 3)) - m.running_mean).norm()
        expected += (a.var(dim=(0, 2, 3), unbiased=False) - m.running_var).norm()
    assert value is not None
    torch.testing.assert_close(value, expected)


# --------------------------------------------------------------------------------------------
# IB fit, robust mask, uniformity loss


class StubHead(nn.Module):
    """A 'teacher' whose head reads only the first ``k`` channels through a saturating non-linearity.

    Class 0 has those channels near +1, class 1 near -1; noise on them pushes tanh out of saturation
    and hurts the prediction consistently, so the IB fit shrinks their noise. The other channels are
    ignored: their noise scale gets no gradient from CE at all.
    """

    def __init__(self, k: int):
        super().__init__()
        self.k = k

    def forward_head(self, z: torch.Tensor) -> torch.Tensor:
        s = torch.tanh(2.0 * z[:, : self.k]).mean(dim=(1, 2, 3))
        return torch.stack([2.0 * s, -2.0 * s], dim=1)


def informative_features(b: int = 32, ch: int = 6, k: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(b) % 2
    z = 0.3 * torch.randn(b, ch, 8, 8, generator=g)  # within-map std 0.3 everywhere: v ~ 0.09
    z[:, :k] += (1.0 - 2.0 * y.float())[:, None, None, None]
    return z, y


def test_ib_fit_marks_ignored_channels_robust():
    k = 2
    z, y = informative_features(k=k)
    head = StubHead(k)
    sigma = ib_fit(head, z, y, steps=40, lr=0.1, beta=0.0, generator=torch.Generator().manual_seed(0))
    assert sigma.shape == (32, 6, 1, 1) and not sigma.requires_grad
    v_max = channel_variance(z).max()
    assert v_max < 0.3  # the design: the initial noise softplus(0)^2 = 0.48 is above every v
    s2 = sigma.squeeze().pow(2)
    # ignored channels: no gradient at all, sigma stays at softplus(0), far above max v
    torch.testing.assert_close(sigma[:, k:], torch.full_like(sigma[:, k:], F.softplus(torch.tensor(0.0)).item()))
    # informative channels: the noise is squeezed well below max v
    assert (s2[:, :k] < v_max).float().mean() >= 0.95
    assert s2[:, :k].median() < 0.5 * v_max
    mask = robust_mask(sigma, z, "global").squeeze()
    assert mask[:, k:].all() and mask[:, :k].float().mean() <= 0.05
    # deterministic for a seed
    again = ib_fit(head, z, y, steps=40, lr=0.1, beta=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sigma, again)


def test_ib_fit_kl_term_pulls_noise_to_feature_variance():
    # no CE signal (the head ignores Z): the Gaussian KL alone drives sigma^2 towards v
    z, y = informative_features(b=8, ch=3)
    z = z * 2.0  # v ~ 0.36 (channels 0-1: larger); sigma0^2 = 0.48
    head = StubHead(0)
    sigma = ib_fit(head, z, y, steps=300, lr=0.05, beta=0.3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sigma.squeeze().pow(2), channel_variance(z), rtol=0.05, atol=1e-3)


def test_robust_mask_global_and_per_sample():
    # sample 0: v = (1, 4); sample 1: v = (0.25, 0.01)
    z = torch.zeros(2, 2, 2, 2)
    for (b, c), std in {(0, 0): 1.0, (0, 1): 2.0, (1, 0): 0.5, (1, 1): 0.1}.items():
        z[b, c] = torch.tensor([[std, -std], [-std, std]])
    torch.testing.assert_close(channel_variance(z), torch.tensor([[1.0, 4.0], [0.25, 0.01]]))
    sigma = torch.tensor([[3.0, 1.0], [0.6, 2.5]]).sqrt()[:, :, None, None]  # sigma^2 = (3, 1), (0.6, 2.5)
    glob = robust_mask(sigma, z, "global").squeeze()  # threshold 4
    assert torch.equal(glob, torch.zeros(2, 2))
    per = robust_mask(sigma, z, "per-sample").squeeze()  # thresholds 4 and 0.25
    assert torch.equal(per, torch.tensor([[0.0, 0.0], [1.0, 1.0]]))
    sigma_big = torch.full((2, 2, 1, 1), 2.01)
    assert robust_mask(sigma_big, z, "global").all()
    with pytest.raises(ValueError):
        robust_mask(sigma, z, "nope")  # type: ignore[arg-type]


def test_uniformity_loss_zero_for_uniform_head_positive_otherwise():
    model = tiny_cnn(1)
    model.eval()
    x = torch.rand(4, *SHAPE)
    z = model.forward_features(x).detach().requires_grad_(True)
    mask = torch.zeros(4, z.shape[1], 1, 1)
    loss = uniformity_loss(model, z, mask)
    assert loss.item() > 0
    loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    # masking every channel makes the head see zeros: output = bias only
    with torch.no_grad():
        model.fc.bias.zero_()
    assert uniformity_loss(model, z, torch.ones_like(mask)).item() == pytest.approx(0.0, abs=1e-6)
    with torch.no_grad():
        model.fc.weight.zero_()
    assert uniformity_loss(model, z, mask).item() == pytest.approx(0.0, abs=1e-6)


def test_capped_ce_is_zero_above_the_cap_and_shifted_ce_below():
    from ferd.losses import capped_ce

    y = torch.tensor([0, 0, 1])
    logits = torch.log(torch.tensor([[0.9, 0.1], [0.4, 0.6], [0.3, 0.7]]))  # p_y = 0.9, 0.4, 0.7
    plain = F.cross_entropy(logits, y, reduction="none")
    assert torch.equal(capped_ce(logits, y), plain)  # kappa = 1: the paper's CE
    capped = capped_ce(logits, y, 0.6)
    assert capped[0] == 0.0 and capped[2] == 0.0  # p_y >= 0.6: no pull
    assert capped[1] == pytest.approx(-torch.log(torch.tensor(0.4 / 0.6)).item(), abs=1e-6)
    z = logits.clone().requires_grad_(True)
    capped_ce(z, y, 0.6).sum().backward()
    assert z.grad[0].abs().sum() == 0 and z.grad[1].abs().sum() > 0


def test_oh_confidence_changes_only_the_oh_term(nets):
    teacher, _ = nets
    base = run_epoch(teacher, None, cfg=tiny_cfg(steps=1, lambda_uni=0.0))
    capped = run_epoch(teacher, None, cfg=tiny_cfg(steps=1, lambda_uni=0.0, oh_confidence=1e-6))
    # step 0's images are the same (same generator, same draws); with kappa -> 0 every image is past the cap
    assert torch.equal(base.x, capped.x)
    assert capped.log["oh"] == 0.0 < base.log["oh"] and capped.log["bn"] == base.log["bn"]


# --------------------------------------------------------------------------------------------
# synthesize_epoch


@pytest.fixture(scope="module")
def nets() -> tuple[nn.Module, nn.Module]:
    return tiny_cnn(0), tiny_cnn(1, width=2)


def run_epoch(teacher, student, cfg=None, seed=0, p=None, **kw) -> EpochSynthesis:
    return synthesize_epoch(teacher, student, torch.full((C,), 1.0 / C) if p is None else p, cfg or tiny_cfg(),
                            image_shape=SHAPE, generator=torch.Generator().manual_seed(seed), device="cpu", **kw)


def test_synthesize_epoch_outputs_determinism_and_frozen_teacher(nets):
    teacher, student = nets
    teacher.train()  # the caller's flags must come back unchanged
    student.train()
    t_before, s_before = snapshot(teacher), snapshot(student)
    hooks_before = hook_count(teacher)
    calls = []
    out = run_epoch(teacher, student, progress=lambda task, d, t, info: calls.append((task, d, t, dict(info))), epoch=5)
    assert out.x.shape == (8, *SHAPE) and out.x.dtype == torch.float32
    assert 0.0 <= out.x.min() and out.x.max() <= 1.0
    assert out.y.dtype == torch.int64 and out.y.shape == (8,)
    assert torch.equal(out.y, out.y.sort().values)
    assert set(out.log) == LOG_KEYS
    assert 0 <= out.log["step"] < 3 and 0.0 <= out.log["teacher_acc"] <= 1.0
    assert 0.0 <= out.log["robust_channels"] <= 1.0
    assert out.log["bn"] > 0 and out.log["uni"] > 0 and out.log["adv"] != 0
    assert [(c[0], c[1], c[2]) for c in calls] == [("synthesis epoch 5", i, 3) for i in (1, 2, 3)]
    # per step the count only; the kept step's loss and the kept batch's teacher accuracy at the end
    assert [set(c[3]) for c in calls] == [set(), set(), {"loss", "teacher_acc"}]
    assert calls[-1][3] == {"loss": out.log["total"], "teacher_acc": out.log["teacher_acc"]}
    # the teacher and student are untouched (parameters, BN buffers), flags restored, no hooks left
    for before, model in ((t_before, teacher), (s_before, student)):
        after = model.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert model.training and all(m.training for m in model.modules())
        assert all(p.requires_grad for p in model.parameters())
    assert hook_count(teacher) == hooks_before == 0
    # same seed, same batch; another seed, another batch
    again = run_epoch(teacher, student)
    assert torch.equal(out.x, again.x) and torch.equal(out.y, again.y) and out.log == again.log
    other = run_epoch(teacher, student, seed=1)
    assert not torch.equal(out.x, other.x)


def test_conditional_generator_epoch_and_carried_state(nets):
    teacher, student = nets
    cfg = tiny_cfg(conditional=True, lambda_uni=0.0)
    out = run_epoch(teacher, student, cfg=cfg)
    assert out.x.shape == (8, *SHAPE) and torch.isfinite(out.x).all()
    assert "embed.weight" in out.gen_state and out.gen_state["embed.weight"].shape == (C, cfg.nz)
    # the embedding is trained (it started at its seeded draw) and deterministic from the seed
    fresh = run_epoch(teacher, student, cfg=tiny_cfg(conditional=True, lambda_uni=0.0, steps=1))
    again = run_epoch(teacher, student, cfg=cfg)
    assert torch.equal(out.x, again.x)
    assert not torch.equal(out.gen_state["embed.weight"], fresh.gen_state["embed.weight"])
    # carried over to the next epoch, and refused by an unconditional generator
    nxt = run_epoch(teacher, student, cfg=cfg, seed=1, gen_state=out.gen_state)
    assert nxt.gen_state["embed.weight"].shape == (C, cfg.nz)
    with pytest.raises(RuntimeError, match="embed"):
        run_epoch(teacher, student, cfg=tiny_cfg(lambda_uni=0.0), gen_state=out.gen_state)
    # the unconditional epoch is untouched by the option's existence
    assert "embed.weight" not in run_epoch(teacher, student, cfg=tiny_cfg(lambda_uni=0.0)).gen_state


def test_synthesize_epoch_labels_from_p_and_fixed_labels(nets):
    teacher, _ = nets
    p = torch.tensor([0.0, 0.0, 1.0, 0.0])
    out = run_epoch(teacher, None, cfg=tiny_cfg(steps=1, lambda_uni=0.0), p=p)
    assert torch.equal(out.y, torch.full((8,), 2))
    assert out.log["adv"] == 0.0  # no student: the term is skipped
    fixed = torch.tensor([0, 0, 1, 1, 2, 3])
    out = run_epoch(teacher, None, cfg=tiny_cfg(steps=1, lambda_uni=0.0), labels=fixed)
    assert torch.equal(out.y, fixed) and out.x.shape == (6, *SHAPE)


def test_lambda_uni_zero_skips_ib(nets, monkeypatch):
    teacher, student = nets
    import ferd.fae as fae

    def boom(*a, **k):
        raise AssertionError("ib_fit must not run when lambda_uni == 0")

    monkeypatch.setattr(fae, "ib_fit", boom)
    out = run_epoch(teacher, student, cfg=tiny_cfg(lambda_uni=0.0))
    assert out.log["uni"] == 0.0 and out.log["robust_channels"] == 0.0


def test_nan_loss_raises_naming_the_term(nets, monkeypatch):
    teacher, student = nets
    before = snapshot(teacher)
    real_head = teacher.forward_head
    monkeypatch.setattr(teacher, "forward_head", lambda z: real_head(z) * float("nan"))
    with pytest.raises(FerdError, match=r"epoch 3, step 0.*L_oh"):
        run_epoch(teacher, student, cfg=tiny_cfg(lambda_uni=0.0), epoch=3)
    monkeypatch.undo()
    assert hook_count(teacher) == 0
    after = teacher.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_ratio_rule_splits_and_uniformity_keeps_the_label(tiny_teacher):
    """fae.ib_threshold: ratio on a trained (tiny) teacher: a non-trivial robust / non-robust split where
    the reference rule is all-or-nothing at the same IB budget; and a uniformity term on the
    non-robust features drives their head to uniform while the full output still predicts y."""
    from ferd.artifacts import load_model
    from ferd.config import DataConfig, SyntheticDataConfig
    from ferd.data import load_split
    from ferd.losses import uniform_kl

    teacher, _ = load_model(tiny_teacher)
    with torch.no_grad():  # a confident teacher: the tiny one's logits are near zero, every head near uniform
        teacher.fc.weight.mul_(30.0)
        teacher.fc.bias.mul_(30.0)
    data = DataConfig(name="synthetic", synthetic=SyntheticDataConfig(num_classes=4, channels=1, image_size=16))
    test = load_split(data, "test")
    x, y = test.images(), test.y
    with torch.no_grad():
        right = teacher(x).argmax(1) == y
    x, y = x[right][:32], y[right][:32]
    feats = teacher.forward_features(x).detach()
    ib = dict(steps=10, lr=0.1, beta=0.3)
    sigma = ib_fit(teacher, feats, y, **ib, generator=torch.Generator().manual_seed(0), matched_init=True)
    ratio = robust_mask(sigma, feats, "ratio")
    assert 0.1 < ratio.mean() < 0.9
    # the reference rule at the same budget is all-or-nothing (here: every v is below the initial
    # noise softplus(0)^2 = 0.48, so everything is "robust"; on the Fashion-MNIST teacher nothing is)
    reference = robust_mask(ib_fit(teacher, feats, y, **ib, generator=torch.Generator().manual_seed(0)), feats, "global")
    assert float(reference.mean()) in (0.0, 1.0)

    # x' = x + delta optimised for CE(T(x'), y) + 5 L_uni(non-robust part), the mask refitted every step
    delta = torch.zeros_like(x, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=0.02)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        start = uniform_kl(teacher.forward_head(feats * (1 - ratio)))
    for _ in range(60):
        xa = (x + delta).clamp(0, 1)
        z = teacher.forward_features(xa)
        sig = ib_fit(teacher, z, y, **ib, generator=g, matched_init=True)
        m = robust_mask(sig, z, "ratio")
        loss = F.cross_entropy(teacher.forward_head(z), y) + 5.0 * uniformity_loss(teacher, z, m)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        xa = (x + delta).clamp(0, 1)
        z = teacher.forward_features(xa)
        m = robust_mask(ib_fit(teacher, z, y, **ib, generator=g, matched_init=True), z, "ratio")
        end = uniform_kl(teacher.forward_head(z * (1 - m)))
        acc = (teacher(xa).argmax(1) == y).float().mean()
    assert start > 1.0  # the non-robust head starts far from uniform (KL in nats; log 4 = 1.39 is one-hot)
    assert 0.05 < m.mean() < 0.95  # still a split
    assert end < 0.5 * start  # pushed towards uniform ...
    assert acc >= 0.9  # ... while the whole output still predicts y
