"""The student's training-time adversarial examples, selected by ``distill.adversary``.

- ``utae`` (FERD, §2.5): :func:`ferd.utae.craft_utae` against the current student; with
  ``utae.gamma = 0`` it is RSLAD's inner maximisation, KL(T(x_F) ‖ S(x')) by PGD.
- ``pgd`` (the adapted DFKD baselines, method reference §8): standard L∞ PGD on the student's
  cross-entropy with the teacher's top-1 label of x_F, random start, ``utae.steps`` steps of
  ``utae.step_size · eps``.
- ``hee`` (DFHL, §8): High-Entropy Examples: ``distill.hee_steps`` signed-gradient steps of absolute
  size ``distill.hee_step_size`` that raise the student's prediction entropy, with **no ε-ball**
  (only [0, 1]), as in DFHL-RS. They can change class, so the distillation target of an HEE is the
  teacher's output on the HEE itself (see :func:`needs_teacher_on_adversary`).

Every adversary uses the student frozen in eval mode (restored afterwards) and returns a detached
tensor on ``x_f``'s device; randomness comes only from ``generator``, drawn on that generator's
device (``distill`` passes one on the compute device, ``ferd.runtime.device_generator``). The
caller may wrap a call in bf16 autocast (``runtime.precision``); objectives use float32 logits.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ferd.attacks import frozen_eval, pgd
from ferd.utae import craft_utae

__all__ = ["BOUNDARY_KINDS", "craft_adversary", "craft_boundary", "craft_hee", "needs_teacher_on_adversary",
           "prediction_entropy"]

#: ``distill.boundary`` values that craft examples (beyond the paper; ``none`` turns the term off).
BOUNDARY_KINDS = ("hee", "hee_teacher", "disagree", "hee+disagree")


def prediction_entropy(logits: Tensor) -> Tensor:
    """Per-sample entropy (nats) of ``softmax(logits)``."""
    logp = F.log_softmax(logits, dim=1)
    return -(logp.exp() * logp).sum(dim=1)


def _signed_ascent(objective: Any, x: Tensor, *, steps: int, step_size: float) -> Tensor:
    """``steps`` signed-gradient ascent steps of ``objective(x).sum()``, clipped to [0, 1] (no ε-ball)."""
    x_h = x.detach().clone()
    for _ in range(steps):
        x_h.requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(objective(x_h).sum(), [x_h])
        x_h = (x_h.detach() + step_size * grad.sign()).clamp_(0.0, 1.0)
    return x_h.detach()


def craft_hee(model: nn.Module, x: Tensor, *, steps: int, step_size: float) -> Tensor:
    """DFHL's High-Entropy Examples: ``x ← clip(x + step_size · sign(∇_x H(softmax(model(x)))), 0, 1)``."""
    if steps < 0 or not step_size > 0:
        raise ValueError(f"craft_hee: need steps >= 0 and step_size > 0 (got {steps}, {step_size})")
    with frozen_eval(model):
        return _signed_ascent(lambda x_h: prediction_entropy(model(x_h).float()), x, steps=steps, step_size=step_size)


def craft_boundary(kind: str, student: nn.Module, teacher: nn.Module, x: Tensor, *, steps: int,
                   step_size: float, global_rows: tuple[int, int] | None = None, hee_share: float = 0.5) -> Tensor:
    """The boundary term's examples x_H (``distill.boundary``, beyond the paper), by signed ascent from ``x``:

    - ``hee``: DFHL's high-entropy examples of the **student** (:func:`craft_hee`), where the student is
      unsure;
    - ``hee_teacher``: high-entropy examples of the **teacher**, ``H(softmax(T(x)))``: the teacher's own
      class boundaries (shirt / T-shirt / pullover / coat on Fashion-MNIST), whatever the student thinks;
    - ``disagree``: the teacher–student discrepancy ``KL(softmax(T(x)) ‖ softmax(S(x)))``, the hard
      samples of data-free adversarial distillation (DFAD, Fang et al. 2019), aimed at wherever the
      student departs from the teacher;
    - ``hee+disagree``: ``hee`` on the first ``⌊hee_share · size⌋`` rows of the global boundary batch
      (``distill.boundary_hee_share``; a half by default), ``disagree`` on the rest (``global_rows`` =
      (index of ``x``'s first row in it, its size), default (0, len(x)), so that data-parallel ranks
      split the rows as one process does).

    Both networks are frozen in eval mode (restored afterwards), so every row's ascent is independent of
    the others'; ``steps · step_size`` bounds the move.
    """
    if steps < 0 or not step_size > 0:
        raise ValueError(f"craft_boundary: need steps >= 0 and step_size > 0 (got {steps}, {step_size})")
    if not 0.0 < hee_share < 1.0:
        raise ValueError(f"craft_boundary: need 0 < hee_share < 1 (got {hee_share})")
    if kind == "hee+disagree":
        start, total = (0, x.shape[0]) if global_rows is None else global_rows
        head = int(hee_share * total)  # floor: 0.5 gives total // 2, as before the share was a parameter
        split = min(max(head - start, 0), x.shape[0])  # this process's rows before the global hee/disagree boundary
        parts = [craft_boundary(part, student, teacher, rows, steps=steps, step_size=step_size)
                 for part, rows in (("hee", x[:split]), ("disagree", x[split:])) if rows.shape[0]]
        return torch.cat(parts)
    if kind == "hee":
        return craft_hee(student, x, steps=steps, step_size=step_size)
    if kind == "hee_teacher":
        return craft_hee(teacher, x, steps=steps, step_size=step_size)
    if kind == "disagree":
        def discrepancy(x_h: Tensor) -> Tensor:
            log_t = F.log_softmax(teacher(x_h).float(), dim=1)
            log_s = F.log_softmax(student(x_h).float(), dim=1)
            return (log_t.exp() * (log_t - log_s)).sum(dim=1)
        with frozen_eval(student), frozen_eval(teacher):
            return _signed_ascent(discrepancy, x, steps=steps, step_size=step_size)
    raise ValueError(f"craft_boundary: unknown kind {kind!r} (expected one of {BOUNDARY_KINDS})")


def needs_teacher_on_adversary(adversary: str) -> bool:
    """True when the adversarial term's target is T(x_adv) rather than T(x_F) (HEEs leave the ε-ball)."""
    return adversary == "hee"


def craft_adversary(
    student: nn.Module,
    x_f: Tensor,
    teacher_logits: Tensor,
    cfg: Any,
    utae: Any,
    *,
    eps: float,
    generator: torch.Generator | None,
    start: Tensor | None = None,
    steps: int | None = None,
    start_noise: Tensor | None = None,
) -> Tensor:
    """The training-time adversarial batch for ``cfg.adversary`` (``cfg``: DistillConfig, ``utae``: UtaeConfig).

    ``start`` and ``steps`` (the cached-UTAE path) apply to ``utae`` only; ``start_noise`` (``pgd``
    only) replaces PGD's uniform random-start draw (see ``ferd.attacks.pgd``).
    """
    alpha = utae.step_size * eps
    if cfg.adversary == "utae":
        return craft_utae(student, x_f, teacher_logits, eps=eps, alpha=alpha, steps=utae.steps if steps is None else steps,
                          gamma=utae.gamma, init_noise=utae.init_noise, generator=generator, start=start)
    if start is not None:
        raise ValueError(f"craft_adversary: a cached start only applies to distill.adversary 'utae', not {cfg.adversary!r}")
    if cfg.adversary == "pgd":
        labels = teacher_logits.argmax(dim=1)
        return pgd(student, x_f, labels, eps=eps, alpha=alpha, steps=utae.steps, generator=generator,
                   start_noise=start_noise)
    if cfg.adversary == "hee":
        return craft_hee(student, x_f, steps=cfg.hee_steps, step_size=cfg.hee_step_size)
    raise ValueError(f"unknown distill.adversary {cfg.adversary!r}")
