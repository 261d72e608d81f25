"""Attacks: threat model (eps-ball, [0, 1]), strength on an undefended model, seeding, model state."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ferd.attacks import autoattack_predictions, cw_inf, fgsm, frozen_eval, margin, pgd, run_attack

NUM_CLASSES = 4
EPS_BIG = 0.5


def make_data(n_per_class: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """1x8x8 images: class k lights up quadrant k (0.8 on 0.2), plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(NUM_CLASSES).repeat_interleave(n_per_class)
    x = torch.full((y.numel(), 1, 8, 8), 0.2)
    for k in range(NUM_CLASSES):
        r, c = divmod(k, 2)
        x[y == k, :, 4 * r:4 * r + 4, 4 * c:4 * c + 4] = 0.8
    x = (x + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    perm = torch.randperm(y.numel(), generator=g)
    return x[perm], y[perm]


def make_model() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(64, 32),
        nn.BatchNorm1d(32),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Linear(32, NUM_CLASSES),
    )


@pytest.fixture(scope="module")
def trained(one_thread):
    """A small undefended model trained to high clean accuracy, and held-out test data."""
    model = make_model()
    x, y = make_data(64, seed=1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    model.eval()
    xt, yt = make_data(16, seed=2)
    with torch.no_grad():
        acc = (model(xt).argmax(1) == yt).float().mean().item()
    assert acc > 0.95, acc
    return model, xt, yt


def assert_in_ball(x_adv: torch.Tensor, x: torch.Tensor, eps: float) -> None:
    assert x_adv.shape == x.shape
    assert not x_adv.requires_grad
    assert (x_adv - x).abs().max().item() <= eps + 1e-6
    assert x_adv.min().item() >= 0.0 and x_adv.max().item() <= 1.0


ATTACKS = {
    "fgsm": lambda m, x, y, eps: fgsm(m, x, y, eps=eps),
    "pgd-ce": lambda m, x, y, eps: pgd(m, x, y, eps=eps, alpha=eps / 4, steps=10),
    "pgd-margin": lambda m, x, y, eps: pgd(m, x, y, eps=eps, alpha=eps / 4, steps=10, loss="margin"),
    "pgd-no-start": lambda m, x, y, eps: pgd(m, x, y, eps=eps, alpha=eps / 4, steps=10, random_start=False),
    "cw": lambda m, x, y, eps: cw_inf(m, x, y, eps=eps, alpha=eps / 4, steps=10),
    "pgd-targeted-ce": lambda m, x, y, eps: pgd(m, x, y, eps=eps, alpha=eps / 4, steps=10, targeted=True,
                                                target=(y + 1) % NUM_CLASSES),
    "pgd-targeted-margin": lambda m, x, y, eps: pgd(m, x, y, eps=eps, alpha=eps / 4, steps=10, targeted=True,
                                                    target=(y + 1) % NUM_CLASSES, loss="margin"),
}


@pytest.mark.parametrize("name", sorted(ATTACKS))
@pytest.mark.parametrize("eps", [0.03, EPS_BIG])
def test_attack_stays_in_threat_model(trained, name, eps):
    model, x, y = trained
    x = x.clone()
    x[0] = 0.0  # saturated pixels: the [0, 1] clamp must hold at the boundaries
    x[1] = 1.0
    x_adv = ATTACKS[name](model, x, y, eps)
    assert_in_ball(x_adv, x, eps)


def test_pgd_breaks_undefended_model(trained):
    model, x, y = trained
    preds = run_attack(model, x, y, name="pgd", eps=EPS_BIG, alpha=0.05, steps=20, batch_size=24,
                       generator=torch.Generator().manual_seed(0))
    assert preds.dtype == torch.int64 and preds.device.type == "cpu"
    assert (preds == y).float().mean().item() <= 0.05
    cw_preds = run_attack(model, x, y, name="cw", eps=EPS_BIG, alpha=0.05, steps=20,
                          generator=torch.Generator().manual_seed(0))
    assert (cw_preds == y).float().mean().item() <= 0.05
    clean = run_attack(model, x, y, name="clean", eps=EPS_BIG)
    fg = run_attack(model, x, y, name="fgsm", eps=EPS_BIG)
    assert (clean == y).float().mean() > 0.95
    assert (fg == y).float().mean() < (clean == y).float().mean()


def test_targeted_pgd_hits_targets(trained):
    model, x, y = trained
    target = (y + 1) % NUM_CLASSES
    for loss in ("ce", "margin"):
        x_adv = pgd(model, x, y, eps=EPS_BIG, alpha=0.05, steps=30, targeted=True, target=target, loss=loss,
                    generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            hit = (model(x_adv).argmax(1) == target).float().mean().item()
        assert hit > 0.9, (loss, hit)


def test_margin():
    logits = torch.tensor([[3.0, 1.0, 2.0], [0.0, 5.0, 5.0]])
    assert margin(logits, torch.tensor([0, 1])).tolist() == [1.0, 0.0]
    assert margin(logits, torch.tensor([1, 0])).tolist() == [-2.0, -5.0]


def test_same_seed_same_examples(trained):
    model, x, y = trained
    runs = [pgd(model, x, y, eps=0.1, alpha=0.02, steps=5, generator=torch.Generator().manual_seed(s))
            for s in (7, 7, 8)]
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])
    a = run_attack(model, x, y, name="cw", eps=0.1, alpha=0.02, steps=5, batch_size=10,
                   generator=torch.Generator().manual_seed(3))
    b = run_attack(model, x, y, name="cw", eps=0.1, alpha=0.02, steps=5, batch_size=10,
                   generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def _state(model: nn.Module):
    return [m.training for m in model.modules()], [p.requires_grad for p in model.parameters()]


def _mixed(model: nn.Module) -> nn.Module:
    model.train()
    model[2].eval()  # the batch-norm layer frozen by the caller
    model[5].weight.requires_grad_(False)
    return model


def test_model_state_restored_and_no_param_grads(trained):
    model, x, y = trained
    _mixed(model)
    before = _state(model)
    bn_stats = model[2].running_mean.clone()
    try:
        # the attack runs in eval mode: same examples whatever the caller's mode was
        x_adv = pgd(model, x, y, eps=0.1, alpha=0.02, steps=3, random_start=False)
        assert _state(model) == before
        assert torch.equal(model[2].running_mean, bn_stats)  # no batch-norm statistics updated
        assert all(p.grad is None for p in model.parameters())
        model.eval()
        assert torch.equal(x_adv, pgd(model, x, y, eps=0.1, alpha=0.02, steps=3, random_start=False))
        _mixed(model)
        fgsm(model, x, y, eps=0.1)
        run_attack(model, x, y, name="pgd", eps=0.1, alpha=0.02, steps=2)
        assert _state(model) == before
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)


def test_frozen_eval_restores_after_exception(trained):
    model, _, _ = trained
    _mixed(model)
    before = _state(model)
    try:
        with pytest.raises(RuntimeError, match="boom"), frozen_eval(model):
            assert not any(m.training for m in model.modules())
            assert not any(p.requires_grad for p in model.parameters())
            raise RuntimeError("boom")
        assert _state(model) == before

        class Exploding(nn.Module):
            def __init__(self, inner):
                super().__init__()
                self.inner = inner
                self.calls = 0

            def forward(self, x):
                self.calls += 1
                if self.calls > 2:
                    raise RuntimeError("boom inside the attack")
                return self.inner(x)

        wrapped = Exploding(model)
        wrapped.train()
        model[2].eval()
        before = _state(wrapped)
        _, x, y = trained
        with pytest.raises(RuntimeError, match="boom inside"):
            pgd(wrapped, x, y, eps=0.1, alpha=0.02, steps=5)
        assert _state(wrapped) == before
        assert all(p.grad is None for p in model.parameters())
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)


def test_argument_validation(trained):
    model, x, y = trained
    with pytest.raises(ValueError, match="eps"):
        pgd(model, x, y, eps=0.0, alpha=0.1, steps=1)
    with pytest.raises(ValueError, match="steps"):
        pgd(model, x, y, eps=0.1, alpha=0.1, steps=0)
    with pytest.raises(ValueError, match="alpha"):
        cw_inf(model, x, y, eps=0.1, alpha=-1.0, steps=1)
    with pytest.raises(ValueError, match="y must"):
        fgsm(model, x, y[:-1], eps=0.1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        fgsm(model, x * 2 + 0.5, y, eps=0.1)
    with pytest.raises(ValueError, match="target"):
        pgd(model, x, y, eps=0.1, alpha=0.1, steps=1, targeted=True)
    with pytest.raises(ValueError, match="targeted=False"):
        pgd(model, x, y, eps=0.1, alpha=0.1, steps=1, target=y)
    with pytest.raises(ValueError, match="loss"):
        pgd(model, x, y, eps=0.1, alpha=0.1, steps=1, loss="dlr")
    with pytest.raises(ValueError, match="alpha and steps"):
        run_attack(model, x, y, name="pgd", eps=0.1)
    with pytest.raises(ValueError, match="unknown attack"):
        run_attack(model, x, y, name="square", eps=0.1)


def test_run_attack_progress(trained):
    model, x, y = trained
    calls = []
    run_attack(model, x, y, name="fgsm", eps=0.1, batch_size=24, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(24, 64), (48, 64), (64, 64)]


@pytest.mark.parametrize("version", ["fast", "standard"])
def test_autoattack_reference(trained, version, capsys):
    model, x, y = trained
    x, y = x[:8], y[:8]
    _mixed(model)
    before = _state(model)
    rng_before = torch.get_rng_state()
    try:
        kw = dict(eps=0.25, version=version, batch_size=8, seed=0, device="cpu")
        preds = autoattack_predictions(model, x, y, **kw)
        assert preds.dtype == torch.int64 and preds.shape == (8,) and preds.device.type == "cpu"
        assert torch.equal(preds, autoattack_predictions(model, x, y, **kw))  # seeded
        assert _state(model) == before
        assert all(p.grad is None for p in model.parameters())
        assert torch.equal(torch.get_rng_state(), rng_before)  # the library's reseeding is undone
        out = capsys.readouterr()
        assert out.out == "" and out.err == ""
        # at a large eps the undefended model falls to zero accuracy
        big = autoattack_predictions(model, x, y, **{**kw, "eps": EPS_BIG})
        assert (big == y).sum().item() == 0
    finally:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(True)


def test_autoattack_standard_at_least_as_strong_as_fast(trained, monkeypatch):
    """Same seed: standard runs fast's two stages first, so its robust points are a subset of fast's.

    Also checks, by intercepting the library's return value, that the examples stay in the threat model.
    """
    import pyautoattack

    model, x, y = trained
    x, y = x[:8], y[:8]
    seen = []
    original = pyautoattack.AutoAttack.run_standard_evaluation

    def spy(self, x_orig, y_orig, **kwargs):
        result = original(self, x_orig, y_orig, **kwargs)
        seen.append((x_orig.clone(), result[0].clone()))
        return result

    monkeypatch.setattr(pyautoattack.AutoAttack, "run_standard_evaluation", spy)
    kw = dict(eps=0.25, batch_size=8, seed=1, device="cpu")  # some points robust, some not
    fast = autoattack_predictions(model, x, y, version="fast", **kw) == y
    std = autoattack_predictions(model, x, y, version="standard", **kw) == y
    assert not (std & ~fast).any()
    assert 0 < std.sum() < 8  # every stage ran on some points, and something was broken
    assert len(seen) == 2
    for x_orig, x_adv in seen:
        assert_in_ball(x_adv, x_orig, 0.25)


def test_autoattack_warnings_are_logged_not_printed(capsys, caplog):
    flat = nn.Sequential(nn.Flatten(), nn.Linear(64, NUM_CLASSES))
    nn.init.zeros_(flat[1].weight)  # zero input gradients: the library warns about them
    x, y = make_data(2, seed=3)
    with caplog.at_level("WARNING", logger="ferd.attacks"):
        autoattack_predictions(flat, x, y, eps=0.1, version="fast", batch_size=8, seed=0, device="cpu")
    out = capsys.readouterr()
    assert out.out == "" and out.err == ""
    assert any("zero gradient" in r.getMessage() for r in caplog.records if r.name == "ferd.attacks")


def test_autoattack_validation(trained):
    model, x, y = trained
    with pytest.raises(ValueError, match="version"):
        autoattack_predictions(model, x, y, eps=0.1, version="plus", batch_size=8, seed=0, device="cpu")
    with pytest.raises(ValueError, match="seed"):
        autoattack_predictions(model, x, y, eps=0.1, version="fast", batch_size=8, seed=None, device="cpu")
    with pytest.raises(ValueError, match="model is on"):
        autoattack_predictions(model, x, y, eps=0.1, version="fast", batch_size=8, seed=0, device="cuda")
    three = nn.Sequential(nn.Flatten(), nn.Linear(64, 3))
    with pytest.raises(ValueError, match="at least 4 classes"):
        autoattack_predictions(three, x, y % 3, eps=0.1, version="fast", batch_size=8, seed=0, device="cpu")
