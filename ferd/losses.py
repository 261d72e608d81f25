"""Losses shared by synthesis and distillation (method reference §2.3, §2.5, §2.6).

- ``kl_div(t, s)``: KL(softmax(t) ‖ softmax(s)), batch mean: the RSLAD-style robust soft-label loss;
  the project's default student loss is λ1·KL(T(x_F)‖S(x_F)) + λ2·KL(T(x_F)‖S(x_U)) (§9 #4).
- ``uniform_kl(logits)``: KL(U ‖ softmax(logits)), batch mean: FERD's uniformity term L_uni (§2.3)
  and the γ-term of the UTAE objective (§2.5).
- ``ikl(t, s, temperature)``: the IKL / DKL loss of Cui et al. (arXiv 2305.13948) as the FERD code's
  ``dkl_loss`` with GI = False: a weighted MSE over all pairwise logit differences, weights
  w = q ⊗ q with q = softmax(t / T2), plus the soft-label cross-entropy (§2.6).
"""

from __future__ import annotations

import math

import torch.nn.functional as F
from torch import Tensor


def kl_div(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """KL(p_T ‖ p_S) averaged over the batch (``teacher_logits`` are treated as constants by callers)."""
    log_p_t = F.log_softmax(teacher_logits, dim=1)
    log_p_s = F.log_softmax(student_logits, dim=1)
    return (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()


def uniform_kl(logits: Tensor) -> Tensor:
    """KL(U ‖ softmax(logits)) averaged over the batch; 0 exactly when the prediction is uniform."""
    num_classes = logits.shape[1]
    log_p = F.log_softmax(logits, dim=1)
    return (-math.log(num_classes) - log_p).mean(dim=1).mean()


def ikl(teacher_logits: Tensor, student_logits: Tensor, temperature: float = 100.0) -> Tensor:
    """IKL/DKL (Cui et al.): ¼·Σ w (Δt − Δs)² / Σ w  +  CE(softmax(t), softmax(s)), w = q⊗q, q = softmax(t/T2)."""
    q = F.softmax(teacher_logits / temperature, dim=1)
    w = q.unsqueeze(2) * q.unsqueeze(1)  # [B, C, C]
    dt = teacher_logits.unsqueeze(2) - teacher_logits.unsqueeze(1)
    ds = student_logits.unsqueeze(2) - student_logits.unsqueeze(1)
    wmse = 0.25 * (w * (dt - ds) ** 2).sum() / w.sum()
    # as the reference dkl_loss: the pairwise weights carry gradient, the soft target of the CE part does not
    ce = -(F.softmax(teacher_logits, dim=1).detach() * F.log_softmax(student_logits, dim=1)).sum(dim=1).mean()
    return wmse + ce


def soft_label_loss(kind: str, teacher_logits: Tensor, student_logits: Tensor, temperature: float = 100.0,
                    kl_temperature: float = 1.0) -> Tensor:
    """The student loss term selected by ``distill.loss``: ``kl``, ``ikl`` or ``ce_hard`` (DFHL, §8).

    ``kl_temperature`` T softens both sides of ``kl`` as in Hinton et al.'s distillation, scaled by T²
    so the gradient keeps its size: T²·KL(softmax(t/T) ‖ softmax(s/T)); T = 1 is the plain KL."""
    if kind == "ce_hard":
        return hard_label_ce(teacher_logits, student_logits)
    if kind == "kl":  # at T = 1 the division and the factor are exact: bit for bit the plain KL
        return kl_temperature ** 2 * kl_div(teacher_logits / kl_temperature, student_logits / kl_temperature)
    if kind == "ikl":
        return ikl(teacher_logits, student_logits, temperature)
    raise ValueError(f"unknown soft-label loss {kind!r}")


def capped_ce(logits: Tensor, y: Tensor, confidence: float = 1.0) -> Tensor:
    """Per-sample L_oh with a confidence cap κ (``fae.oh_confidence``, beyond the paper): max(0, CE + log κ).

    CE(logits, y) = −log p_y, so the term is −log(p_y / κ) while p_y < κ and exactly 0 once p_y ≥ κ:
    the generator is paid to make the teacher say y, not to make it certain. κ = 1 is the plain CE
    of the paper's L_oh (§2.3).
    """
    ce = F.cross_entropy(logits, y, reduction="none")
    return ce if confidence >= 1.0 else (ce + math.log(confidence)).clamp_min(0.0)


def hard_label_ce(teacher_logits: Tensor, student_logits: Tensor) -> Tensor:
    """DFHL's student loss (§8): mean cross-entropy of the student on the teacher's top-1 label."""
    return F.cross_entropy(student_logits, teacher_logits.detach().argmax(dim=1))


__all__ = ["capped_ce", "hard_label_ce", "ikl", "kl_div", "soft_label_loss", "uniform_kl"]
