"""UTAEs (§2.5): threat model, γ = 0 is KL-PGD, γ > 0 spreads the attack targets, the pool-wide set."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from ferd.config import UtaeConfig
from ferd.models import build_model
from ferd.utae import (
    attacked_classes,
    craft_utae,
    generate_utae_set,
    histogram_entropy,
    target_histogram,
    utae_objective,
)

EPS = 0.1


def _cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return build_model("cnn", width=4, num_classes=4, in_channels=1, image_size=16).eval()


def _images(n: int = 16, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(seed))


class _Collapse(nn.Module):
    """A hand-made linear model on 1x2x4 images where plain KL-PGD collapses onto class 1.

    Pixels (flattened): 0 = w lowers the clean class 0 (logit 4 - 100 (w - 0.5)); 1 = s raises class 1
    and lowers classes 2 and 3 (±40 (s - 0.5)); 2..4 = per-sample offsets o_c of classes 1..3
    (5 o_c). Class 1 starts as the runner-up, so the KL-PGD gradient favours raising s, and once it
    does, class 1 wins everywhere. The uniform term (γ > 0) pushes s down instead (raising s makes
    two classes very unlikely), and the targets split between classes 2 and 3.
    """

    def __init__(self) -> None:
        super().__init__()
        w = torch.zeros(4, 8)
        b = torch.zeros(4)
        w[0, 0], b[0] = -100.0, 54.0
        w[1, 1], w[2, 1], w[3, 1] = 40.0, -40.0, -40.0
        for c in (1, 2, 3):
            w[c, 1 + c] = 5.0
        b[1], b[2], b[3] = -20.0, 18.5, 18.5
        self.register_buffer("w", w)
        self.register_buffer("b", b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1) @ self.w.T + self.b


def _collapse_images(n: int = 64) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x = torch.full((n, 8), 0.5)
    x[:, 2:5] = torch.rand(n, 3, generator=g) * 0.4 + 0.3
    x[:, 5:] = torch.rand(n, 3, generator=g)
    return x.view(n, 1, 2, 4)


def test_craft_stays_in_threat_model_and_restores_model():
    model = _cnn().train()
    x = _images()
    x[:4] = 0.0  # corners of [0, 1] exercise the clamp
    x[4:8] = 1.0
    with torch.no_grad():
        t = _cnn(1).eval()(x)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for gamma in (0.0, 0.5):
        xu = craft_utae(model, x, t, eps=EPS, alpha=EPS / 4, steps=5, gamma=gamma, init_noise=0.001,
                        generator=torch.Generator().manual_seed(0))
        assert xu.shape == x.shape and not xu.requires_grad
        assert (xu - x).abs().max() <= EPS + 1e-6
        assert xu.min() >= 0.0 and xu.max() <= 1.0
        assert (xu - x).abs().max() > EPS / 2  # it actually moved
    assert model.training  # mode restored
    assert all(p.requires_grad for p in model.parameters())
    for k, v in model.state_dict().items():  # eval mode: BN buffers untouched
        assert torch.equal(v, before[k]), k


def test_start_is_projected_and_used():
    model = _cnn()
    x = _images(8)
    with torch.no_grad():
        t = model(x)
    start = (x + 0.5).clamp(0, 1)  # far outside the ball
    xu0 = craft_utae(model, x, t, eps=EPS, alpha=EPS / 4, steps=0, gamma=0.3, init_noise=0.0, generator=None, start=start)
    assert torch.allclose(xu0, torch.minimum(x + EPS, torch.ones_like(x)))
    xu = craft_utae(model, x, t, eps=EPS, alpha=EPS / 4, steps=3, gamma=0.3, init_noise=0.0, generator=None, start=start)
    assert (xu - x).abs().max() <= EPS + 1e-6


def test_gamma_zero_is_kl_pgd_and_increases_the_objective():
    model = _cnn()
    x = _images()
    with torch.no_grad():
        t = _cnn(1)(x)
    xu = craft_utae(model, x, t, eps=EPS, alpha=EPS / 4, steps=4, gamma=0.0, init_noise=0.001,
                    generator=torch.Generator().manual_seed(3))
    # an independent KL-PGD: same start, sign-gradient steps on the summed KL, projection
    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    ref = (x + 0.001 * noise).clamp(x - EPS, x + EPS).clamp(0, 1)
    p_t = torch.softmax(t, dim=1)
    for _ in range(4):
        ref = ref.detach().requires_grad_(True)
        log_p = torch.log_softmax(model(ref), dim=1)
        kl = (p_t * (p_t.log() - log_p)).sum()
        (g,) = torch.autograd.grad(kl, [ref])
        ref = torch.min(torch.max(ref.detach() + EPS / 4 * g.sign(), x - EPS), x + EPS).clamp(0, 1)
    assert torch.allclose(xu, ref, atol=1e-6)
    with torch.no_grad():
        assert utae_objective(t, model(xu), 0.0).sum() > utae_objective(t, model(x), 0.0).sum()


def test_uniform_term_spreads_the_attack_targets():
    model = _Collapse()
    x = _collapse_images()
    with torch.no_grad():
        logits = model(x)
    y_ref = logits.argmax(dim=1)
    assert (y_ref == 0).all()
    target = 3.0 * logits  # a sharper "teacher" on the clean image; the model is the "student"
    entropies, hists = {}, {}
    for gamma in (0.0, 0.3, 1.0):
        xu = craft_utae(model, x, target, eps=EPS, alpha=EPS / 4, steps=10, gamma=gamma, init_noise=0.001,
                        generator=torch.Generator().manual_seed(0))
        assert (xu - x).abs().max() <= EPS + 1e-6
        hists[gamma] = target_histogram(attacked_classes(model, xu, y_ref), y_ref, 4)
        entropies[gamma] = histogram_entropy(hists[gamma])
    plain = hists[0.0]
    assert plain[1] >= 0.75 * plain.sum() and plain.sum() >= 48  # plain KL-PGD collapses onto class 1
    for gamma in (0.3, 1.0):
        assert hists[gamma].sum() >= 48  # the attack still works
        assert entropies[gamma] > entropies[0.0] + 0.05, (gamma, hists)


def test_histogram_and_entropy():
    pred = torch.tensor([1, 1, 2, 0, 3, 3])
    ref = torch.tensor([0, 1, 0, 0, 0, 0])
    hist = target_histogram(pred, ref, 5)
    assert hist.dtype == torch.int64 and hist.tolist() == [0, 1, 1, 2, 0]
    assert histogram_entropy(torch.zeros(4, dtype=torch.long)) == 0.0
    assert histogram_entropy(torch.tensor([0, 7, 0])) == 0.0
    assert histogram_entropy(torch.tensor([3, 3, 3, 3])) == pytest.approx(math.log(4))
    assert histogram_entropy(hist) == pytest.approx(-(0.25 * math.log(0.25) * 2 + 0.5 * math.log(0.5)))


def test_generate_utae_set():
    teacher = _cnn().train()
    x = _images(10)
    calls = []
    cfg = UtaeConfig(gamma=0.5, steps=3)
    out = generate_utae_set(teacher, x, cfg=cfg, eps=EPS, batch_size=4, generator=torch.Generator().manual_seed(0),
                            progress=lambda *a: calls.append(a))
    assert teacher.training
    assert out.delta.shape == x.shape and out.delta.dtype == torch.float32
    assert out.delta.abs().max() <= EPS + 1e-6
    xu = x + out.delta
    assert xu.min() >= -1e-6 and xu.max() <= 1 + 1e-6
    assert out.hist.dtype == torch.int64 and out.hist.shape == (4,)
    assert int(out.hist.sum()) == round(out.success * 10)
    assert int(out.hist_plain.sum()) == round(out.success_plain * 10)
    with torch.no_grad():
        assert torch.equal(out.clean_pred, teacher.eval()(x).argmax(1))
    assert [c[1] for c in calls] == [4, 8, 10]
    # determinism, and gamma = 0 gives the same histogram for both (same start)
    again = generate_utae_set(teacher, x, cfg=cfg, eps=EPS, batch_size=4, generator=torch.Generator().manual_seed(0))
    assert torch.equal(again.delta, out.delta)
    zero = generate_utae_set(teacher, x, cfg=UtaeConfig(gamma=0.0, steps=3), eps=EPS, batch_size=4,
                             generator=torch.Generator().manual_seed(0))
    assert torch.equal(zero.hist, zero.hist_plain) and torch.equal(zero.hist_plain, out.hist_plain)
