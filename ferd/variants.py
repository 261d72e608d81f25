"""Named method variants: FERD, its ablations and the baselines, each a set of params overrides.

A variant is nothing but ``-S key=value`` overrides of params.yaml, so every one is reachable with
``dvc exp run -n NAME -S ...`` and DVC sees exactly which stages it touches. Every variant sets
**all** of :data:`SWITCHES` explicitly, so the result does not depend on what params.yaml (or a
previous experiment in the same workspace) left in those keys; anything not in a variant (budget,
architecture, seed) comes from params.yaml and the comparison setting, and an override given after
the variant's wins. ``distill.boundary`` (the project's boundary term, beyond the paper) is a switch
only so that the published baselines can run without it; FERD, its ablations and ``plain`` all keep
it, so the paper's FERD is one more override: ``dvc exp run -S distill.boundary=none``.

Method reference: §6.3 (the ablations), §8 (DFHL: uniform classes, no IB / no L_uni, high-entropy
examples, teacher hard-label cross-entropy; the adapted DFKD baselines: Fast/CMI-style synthesis
without the IB term, student trained on plain PGD examples with the RSLAD loss 5/6·KL + 1/6·KL).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["FERD_GAMMA", "FERD_LAMBDA_UNI", "PROJECT_BOUNDARY", "SWITCHES", "VARIANTS", "Variant", "set_flags", "variant"]

#: The params keys the variants switch. Everything else is shared by all variants of a comparison.
SWITCHES = ("reweight.method", "reweight.signal", "fae.lambda_uni", "utae.gamma", "distill.adversary", "distill.loss",
            "distill.boundary")

#: FERD's own values of its two continuous switches (method reference §4 / project default §9 #2).
FERD_LAMBDA_UNI = 5.0
FERD_GAMMA = 0.3

#: The project's boundary term (``distill.boundary``, beyond the paper, params.yaml's default): FERD,
#: its ablations and ``plain`` share it, so they differ only in FERD's own switches; the two published
#: baselines run as published, without it (DFHL's own adversary is the high-entropy example).
PROJECT_BOUNDARY = "hee+disagree"


@dataclass(frozen=True)
class Variant:
    """One row of the comparison: a name, what it is, and its switch values."""

    name: str
    description: str
    overrides: dict[str, Any]


def _v(name: str, description: str, method: str, lambda_uni: float, gamma: float, adversary: str, loss: str,
       signal: str = "teacher", boundary: str = PROJECT_BOUNDARY) -> Variant:
    values = (method, signal, lambda_uni, gamma, adversary, loss, boundary)
    return Variant(name, description, dict(zip(SWITCHES, values, strict=True)))


#: Every variant, in the order of the comparison table. UTAE γ is 0 wherever the UTAE is not the
#: student's adversary, so those variants share gen-utae's cached output with ``plain``.
VARIANTS: dict[str, Variant] = {
    v.name: v
    for v in (
        _v("ferd", "FERD: robustness-guided reweighting (teacher's synthetic fragility, the paper) + FAE uniformity "
           "+ UTAE (γ)", "softmax", FERD_LAMBDA_UNI, FERD_GAMMA, "utae", "kl"),
        _v("ferd-student", "FERD with the student signal: p from the student's robust error on the synthetic holdout",
           "softmax", FERD_LAMBDA_UNI, FERD_GAMMA, "utae", "kl", signal="student"),
        _v("ferd-oracle", "diagnostic upper bound, not a method: p from the teacher's fragility on REAL images",
           "softmax", FERD_LAMBDA_UNI, FERD_GAMMA, "utae", "kl", signal="oracle"),
        _v("no-reweight", "FERD without reweighting (uniform class proportions)", "uniform", FERD_LAMBDA_UNI,
           FERD_GAMMA, "utae", "kl"),
        _v("no-fae-uni", "FERD without the FAE uniformity term (λ_uni = 0, no IB fit)", "softmax", 0.0, FERD_GAMMA,
           "utae", "kl"),
        _v("no-utae-gamma", "FERD without the UTAE uniform-target term (γ = 0: RSLAD's KL-PGD)", "softmax",
           FERD_LAMBDA_UNI, 0.0, "utae", "kl"),
        _v("plain", "all three off: plain data-free robustness distillation (RSLAD on synthetic data)", "uniform", 0.0,
           0.0, "utae", "kl"),
        _v("dfhl", "DFHL-style: uniform classes, no IB, high-entropy examples, teacher hard-label CE", "uniform", 0.0,
           0.0, "hee", "ce_hard", boundary="none"),
        _v("dfkd-rslad", "DFKD + RSLAD: synthesis without the IB term, plain PGD examples, RSLAD loss", "uniform", 0.0,
           0.0, "pgd", "kl", boundary="none"),
    )
}


def variant(name: str) -> Variant:
    """The variant called ``name``; a clear error listing the valid names otherwise."""
    from ferd.errors import ConfigError

    try:
        return VARIANTS[name]
    except KeyError:
        raise ConfigError(f"unknown variant {name!r}; choose one of: {', '.join(VARIANTS)}") from None


def _format(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_format(v) for v in value) + "]"
    return str(value)


def set_flags(overrides: dict[str, Any]) -> list[str]:
    """``dvc exp run`` arguments ``-S key=value`` for ``overrides`` (YAML-parsable values)."""
    flags: list[str] = []
    for key, value in overrides.items():
        flags += ["-S", f"{key}={_format(value)}"]
    return flags
