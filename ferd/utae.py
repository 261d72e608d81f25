"""Uniform-Target Adversarial Examples, UTAEs (method reference §2.5; project default §9 #2, #3).

From a fairness-aware example ``x_F`` (a pool image, augmented during distillation)::

    x_U^0     = x_F + init_noise · N(0, I)                       (or a cached start, see below)
    x_U^{t+1} = Π_{B∞(x_F, ε) ∩ [0,1]} ( x_U^t + α · sign ∇ [ KL(p_tgt ‖ p_M(x_U^t)) − γ · KL(U ‖ p_M(x_U^t)) ] )

with ``p_tgt = softmax(target_logits)`` (the teacher on the clean ``x_F``) and ``M`` the attacked
model, frozen in eval mode. Both KL terms are summed over the batch (the sign makes the scale
irrelevant). γ = 0 is the standard KL-PGD, i.e. the RSLAD inner maximisation; γ > 0 keeps the
adversarial output close to uniform, so that attack targets spread over the classes instead of
collapsing onto the easiest one.

Two uses (§9 #3): the stand-alone ``gen-utae`` stage attacks the **teacher** (the paper's written
equation, :func:`generate_utae_set`); ``distill`` attacks the **current student** on the fly (the
reference code / RSLAD convention, via :func:`craft_utae`). The attack-target histogram
(:func:`target_histogram`, :func:`histogram_entropy`) measures the spread that γ buys.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ferd.attacks import frozen_eval, model_device, project
from ferd.config import UtaeConfig
from ferd.runtime import Progress, device_generator, no_progress

__all__ = [
    "UtaeSet",
    "attacked_classes",
    "craft_utae",
    "generate_utae_set",
    "histogram_entropy",
    "target_histogram",
    "utae_objective",
]


def utae_objective(target_logits: Tensor, logits: Tensor, gamma: float) -> Tensor:
    """Per-sample ``KL(softmax(target) ‖ softmax(logits)) − γ · KL(U ‖ softmax(logits))`` (shape [N])."""
    log_p = F.log_softmax(logits, dim=1)
    log_t = F.log_softmax(target_logits, dim=1)
    kl = (log_t.exp() * (log_t - log_p)).sum(dim=1)
    if gamma == 0:
        return kl
    uni = (-math.log(logits.shape[1]) - log_p).mean(dim=1)
    return kl - gamma * uni


def craft_utae(
    model: nn.Module,
    x_f: Tensor,
    target_logits: Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    gamma: float,
    init_noise: float,
    generator: torch.Generator | None,
    start: Tensor | None = None,
) -> Tensor:
    """UTAEs of ``x_f`` against ``model`` (§2.5); a detached tensor in B∞(x_f, eps) ∩ [0, 1].

    ``start`` (e.g. a cached perturbed image) replaces the noisy start ``x_f + init_noise·N(0, I)``;
    either start is projected into the threat model first. The noise is drawn from ``generator`` on
    its own device (the hot loop passes one on ``x_f``'s device, ``ferd.runtime.device_generator``;
    a CPU generator draws on the CPU and the noise is copied), so a seeded generator gives the same
    result on a device. ``model`` is used frozen in eval mode and restored afterwards; only input
    gradients are taken, the objective on float32 logits (the caller may wrap the call in bf16
    autocast). ``steps = 0`` returns the projected start.
    """
    if x_f.ndim < 2 or not x_f.is_floating_point():
        raise ValueError(f"craft_utae: x_f must be a float tensor [N, ...], got {tuple(x_f.shape)}")
    if target_logits.ndim != 2 or target_logits.shape[0] != x_f.shape[0]:
        raise ValueError(f"craft_utae: target_logits must be [{x_f.shape[0]}, C], got {tuple(target_logits.shape)}")
    if not eps > 0 or not alpha > 0 or steps < 0 or gamma < 0:
        raise ValueError(f"craft_utae: need eps > 0, alpha > 0, steps >= 0, gamma >= 0 (got {eps}, {alpha}, {steps}, {gamma})")
    x_f = x_f.detach()
    target = target_logits.detach().to(x_f.device)
    if start is not None:
        if start.shape != x_f.shape:
            raise ValueError(f"craft_utae: start has shape {tuple(start.shape)}, expected {tuple(x_f.shape)}")
        x_u = start.detach().to(device=x_f.device, dtype=x_f.dtype)
    else:
        noise_device = "cpu" if generator is None else generator.device
        noise = torch.randn(x_f.shape, generator=generator, dtype=x_f.dtype, device=noise_device).to(x_f.device)
        x_u = x_f + init_noise * noise
    x_u = project(x_u, x_f, eps)
    with frozen_eval(model):
        for _ in range(steps):
            x_u = x_u.detach().requires_grad_(True)
            with torch.enable_grad():
                obj = utae_objective(target, model(x_u).float(), gamma).sum()
                (grad,) = torch.autograd.grad(obj, [x_u])
            x_u = project(x_u.detach() + alpha * grad.sign(), x_f, eps)
    return x_u.detach()


@torch.no_grad()
def attacked_classes(model: nn.Module, x_u: Tensor, y_ref: Tensor, *, batch_size: int = 256) -> Tensor:
    """``argmax model(x_u)`` (int64, CPU), the model frozen in eval mode.

    ``y_ref`` (the model's clean prediction) only fixes the expected length here; pass both to
    :func:`target_histogram` to count the classes the attack moved samples *to*.
    """
    if y_ref.shape != x_u.shape[:1]:
        raise ValueError(f"attacked_classes: y_ref must have shape [{x_u.shape[0]}], got {tuple(y_ref.shape)}")
    device = model_device(model)
    out = torch.empty(x_u.shape[0], dtype=torch.long)
    with frozen_eval(model):
        for i in range(0, x_u.shape[0], batch_size):
            out[i:i + batch_size] = model(x_u[i:i + batch_size].to(device)).argmax(dim=1).cpu()
    return out


def target_histogram(pred_adv: Tensor, y_ref: Tensor, num_classes: int) -> Tensor:
    """Counts [C] (int64) of the adversarial classes of the samples whose prediction the attack changed."""
    if pred_adv.shape != y_ref.shape:
        raise ValueError(f"target_histogram: shapes differ: {tuple(pred_adv.shape)} vs {tuple(y_ref.shape)}")
    moved = pred_adv.cpu()[pred_adv.cpu() != y_ref.cpu()].long()
    return torch.bincount(moved, minlength=num_classes)[:num_classes].to(torch.int64)


def histogram_entropy(counts: Tensor) -> float:
    """Shannon entropy (nats) of a count histogram; 0.0 for an empty one (maximum log C: uniform)."""
    c = counts.double().flatten()
    total = c.sum().item()
    if total <= 0:
        return 0.0
    p = c[c > 0] / total
    return float(-(p * p.log()).sum().item())


@dataclass
class UtaeSet:
    """UTAEs of a pool against the teacher, and the attack-target spread with and without γ.

    ``delta``: float32 [N,C,H,W], x_U − x_F for the configured γ (CPU); ``hist``/``hist_plain``:
    int64 [K] targets of the changed predictions for γ and for γ = 0 (same random start);
    ``success``/``success_plain``: fraction of images whose prediction changed; ``clean_pred``:
    the teacher's clean prediction (int64 [N]); ``pred_adv``/``pred_adv_plain``: int64 [N].
    """

    delta: Tensor
    hist: Tensor
    hist_plain: Tensor
    success: float
    success_plain: float
    clean_pred: Tensor
    pred_adv: Tensor
    pred_adv_plain: Tensor
    gamma: float

    @property
    def entropy(self) -> float:
        return histogram_entropy(self.hist)

    @property
    def entropy_plain(self) -> float:
        return histogram_entropy(self.hist_plain)


def generate_utae_set(
    teacher: nn.Module,
    x: Tensor,
    *,
    cfg: UtaeConfig,
    eps: float,
    batch_size: int,
    generator: torch.Generator | None,
    progress: Progress = no_progress,
) -> UtaeSet:
    """For every image of ``x`` (CPU, [N,C,H,W] in [0,1]): the UTAE against the teacher (§2.5, the
    paper's written equation: target = teacher(x_F), model = teacher) with ``cfg.gamma``, and the
    plain KL-PGD (γ = 0) from the same random start, for the attack-target comparison.
    ``progress("utae", done, total, info)`` after each batch."""
    if x.ndim != 4:
        raise ValueError(f"generate_utae_set: x must be [N, C, H, W], got {tuple(x.shape)}")
    if x.shape[0] == 0:
        raise ValueError("generate_utae_set: x holds no images")
    if batch_size < 1:
        raise ValueError(f"generate_utae_set: batch_size must be >= 1, got {batch_size}")
    device = model_device(teacher)
    noise_generator = device_generator(generator, device)  # the CPU generator itself on the CPU
    noise_device = "cpu" if noise_generator is None else noise_generator.device
    n = x.shape[0]
    alpha = cfg.step_size * eps
    delta = torch.empty(x.shape, dtype=torch.float32)
    clean = torch.empty(n, dtype=torch.long)
    adv = torch.empty(n, dtype=torch.long)
    adv_plain = torch.empty(n, dtype=torch.long)
    with frozen_eval(teacher):
        for i in range(0, n, batch_size):
            xb = x[i:i + batch_size].to(device=device, dtype=torch.float32)
            with torch.no_grad():
                t = teacher(xb)
            noise = torch.randn(xb.shape, generator=noise_generator, dtype=xb.dtype, device=noise_device).to(device)
            start = xb + cfg.init_noise * noise
            common = dict(eps=eps, alpha=alpha, steps=cfg.steps, init_noise=cfg.init_noise, generator=generator, start=start)
            xu = craft_utae(teacher, xb, t, gamma=cfg.gamma, **common)
            xu_plain = xu if cfg.gamma == 0 else craft_utae(teacher, xb, t, gamma=0.0, **common)
            with torch.no_grad():
                clean[i:i + xb.shape[0]] = t.argmax(dim=1).cpu()
                adv[i:i + xb.shape[0]] = teacher(xu).argmax(dim=1).cpu()
                adv_plain[i:i + xb.shape[0]] = teacher(xu_plain).argmax(dim=1).cpu()
            delta[i:i + xb.shape[0]] = (xu - xb).float().cpu()
            done = min(i + batch_size, n)
            progress("utae", done, n, {"success": float((adv[:done] != clean[:done]).float().mean())})
    num_classes = int(t.shape[1])
    return UtaeSet(
        delta=delta,
        hist=target_histogram(adv, clean, num_classes),
        hist_plain=target_histogram(adv_plain, clean, num_classes),
        success=float((adv != clean).float().mean()),
        success_plain=float((adv_plain != clean).float().mean()),
        clean_pred=clean,
        pred_adv=adv,
        pred_adv_plain=adv_plain,
        gamma=float(cfg.gamma),
    )
