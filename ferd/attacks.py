"""L-inf white-box attacks for the per-class robustness evaluation (§5).

Every attack here runs on the model *frozen in eval mode* (:func:`frozen_eval`: batch-norm uses its
running statistics, dropout is off, parameters do not require gradients; the caller's flags are
restored afterwards), takes gradients with respect to the input only (``torch.autograd.grad``), and
returns a detached tensor ``x_adv`` with ``x_adv`` in ``[0, 1]`` and ``||x_adv - x||_inf <= eps``.
Models map ``[0, 1]`` images to logits (normalisation, if any, lives inside the model).

* FGSM: one signed-gradient step of size ``eps`` on the cross-entropy loss, no random start
  (Goodfellow, Shlens & Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015).
* PGD: ``steps`` signed-gradient steps of size ``alpha``, each followed by projection onto the
  eps-ball and ``[0, 1]``, from a uniform random start in the eps-ball (Madry et al., "Towards Deep
  Learning Models Resistant to Adversarial Attacks", ICLR 2018). Loss: cross-entropy or the margin
  below; untargeted (increase the loss of ``y``) or targeted (decrease the cross-entropy to
  ``target`` / increase the margin of ``target``).
* CW-inf: PGD on the Carlini-Wagner margin loss ``logit_y - max_{j != y} logit_j`` (Carlini &
  Wagner, "Towards Evaluating the Robustness of Neural Networks", S&P 2017), the L-inf variant used
  by the robust-distillation literature.
* AutoAttack (Croce & Hein, "Reliable Evaluation of Adversarial Robustness with an Ensemble of
  Diverse Parameter-free Attacks", ICML 2020) through the reference implementation
  (``pyautoattack``, the fra31 code), not a re-implementation: see :func:`autoattack_predictions`.

Random starts draw from the given CPU ``torch.Generator`` (and the noise is then moved to ``x``'s
device), so a seeded generator gives the same adversarial examples on every device.
"""

from __future__ import annotations

import contextlib
import io
import logging
import sys
from collections.abc import Callable, Iterator
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "frozen_eval",
    "margin",
    "fgsm",
    "pgd",
    "cw_inf",
    "run_attack",
    "autoattack_predictions",
    "AUTOATTACK_FAST_ATTACKS",
]

log = logging.getLogger(__name__)

#: The ``fast`` AutoAttack subset: the first two stages of the standard version, with the same
#: settings (APGD-CE, 1 restart; APGD-T, 1 restart). It is cheaper and its robust accuracy is an
#: upper bound on standard AutoAttack's; it is NOT comparable to published AutoAttack numbers.
AUTOATTACK_FAST_ATTACKS = ("apgd-ce", "apgd-t")

_TOL = 1e-6  # float slack for the eps-ball and [0, 1] checks


# --------------------------------------------------------------------------------------------
# helpers



@contextlib.contextmanager
def frozen_eval(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode with ``requires_grad=False`` on its parameters; restore on exit.

    The training flag of every submodule and the ``requires_grad`` flag of every parameter are
    saved and restored individually (a mixed state such as ``model.train()`` with one frozen
    submodule in eval mode comes back unchanged), also when the body raises.
    """
    modes = [(m, m.training) for m in model.modules()]
    flags = [(p, p.requires_grad) for p in model.parameters()]
    try:
        model.eval()
        for p, _ in flags:
            p.requires_grad_(False)
        yield model
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad in flags:
            p.requires_grad_(requires_grad)


def margin(logits: Tensor, y: Tensor) -> Tensor:
    """Per-sample ``logit_y - max_{j != y} logit_j`` (positive iff ``y`` is the unique argmax)."""
    if logits.ndim != 2 or logits.shape[1] < 2:
        raise ValueError(f"margin: expected logits of shape [N, C] with C >= 2, got {tuple(logits.shape)}")
    if y.shape != logits.shape[:1]:
        raise ValueError(f"margin: expected labels of shape [{logits.shape[0]}], got {tuple(y.shape)}")
    y = y.to(device=logits.device, dtype=torch.long)
    true = logits.gather(1, y[:, None]).squeeze(1)
    mask = F.one_hot(y, logits.shape[1]).bool()
    other = logits.masked_fill(mask, float("-inf")).amax(dim=1)
    return true - other


def _check_inputs(x: Tensor, y: Tensor, eps: float, what: str) -> None:
    if not isinstance(x, Tensor) or not x.is_floating_point() or x.ndim < 2:
        raise ValueError(f"{what}: x must be a floating-point tensor [N, ...], got {getattr(x, 'shape', x)!r}")
    if not isinstance(y, Tensor) or y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(f"{what}: y must be a 1-D label tensor of length {x.shape[0]}, got {getattr(y, 'shape', y)!r}")
    if y.is_floating_point() or y.dtype == torch.bool:
        raise ValueError(f"{what}: y must hold integer class labels, got dtype {y.dtype}")
    if not (isinstance(eps, int | float) and not isinstance(eps, bool) and eps > 0):
        raise ValueError(f"{what}: eps must be a number > 0, got {eps!r}")
    if x.numel() and (x.min().item() < 0.0 or x.max().item() > 1.0):
        raise ValueError(f"{what}: x must lie in [0, 1] (the model normalises internally), "
                         f"got values in [{x.min().item():.4g}, {x.max().item():.4g}]")


def _check_steps(alpha: float, steps: int, what: str) -> None:
    if not (isinstance(alpha, int | float) and not isinstance(alpha, bool) and alpha > 0):
        raise ValueError(f"{what}: alpha (step size) must be a number > 0, got {alpha!r}")
    if not (isinstance(steps, int) and not isinstance(steps, bool) and steps >= 1):
        raise ValueError(f"{what}: steps must be an integer >= 1, got {steps!r}")


def project(x_adv: Tensor, x: Tensor, eps: float) -> Tensor:
    """Project onto the L-inf eps-ball around ``x`` intersected with ``[0, 1]``."""
    return torch.minimum(torch.maximum(x_adv, x - eps), x + eps).clamp_(0.0, 1.0)


def _input_grad(model: nn.Module, x_adv: Tensor, objective: Callable[[Tensor], Tensor]) -> Tensor:
    """Gradient of ``objective(model(x_adv)).sum()`` with respect to the input only."""
    x_adv = x_adv.detach().requires_grad_(True)
    with torch.enable_grad():
        obj = objective(model(x_adv)).sum()
        (grad,) = torch.autograd.grad(obj, [x_adv])
    return grad.detach()


def _check_ball(x_adv: Tensor, x: Tensor, eps: float, what: str) -> None:
    """Raise if ``x_adv`` left the eps-ball or [0, 1] (a bug, not a user error)."""
    if x_adv.shape != x.shape:
        raise RuntimeError(f"{what}: adversarial batch has shape {tuple(x_adv.shape)}, expected {tuple(x.shape)}")
    if x_adv.numel() == 0:
        return
    dist = (x_adv - x.to(x_adv.device)).abs().max().item()
    lo, hi = x_adv.min().item(), x_adv.max().item()
    if not dist <= eps + _TOL or lo < -_TOL or hi > 1.0 + _TOL:
        raise RuntimeError(f"{what}: adversarial examples left the threat model "
                           f"(max |delta| = {dist:.6g} for eps = {eps:.6g}, range [{lo:.6g}, {hi:.6g}])")


# --------------------------------------------------------------------------------------------
# attacks


def fgsm(model: nn.Module, x: Tensor, y: Tensor, *, eps: float) -> Tensor:
    """FGSM (Goodfellow et al. 2015): ``clip(x + eps * sign(grad_x CE(model(x), y)), 0, 1)``."""
    _check_inputs(x, y, eps, "fgsm")
    x = x.detach()
    y = y.to(device=x.device, dtype=torch.long)
    with frozen_eval(model):
        grad = _input_grad(model, x, lambda logits: F.cross_entropy(logits, y, reduction="none"))
        x_adv = project(x + eps * grad.sign(), x, eps)
    return x_adv.detach()


def pgd(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    random_start: bool = True,
    loss: Literal["ce", "margin"] = "ce",
    targeted: bool = False,
    target: Tensor | None = None,
    generator: torch.Generator | None = None,
    start_noise: Tensor | None = None,
) -> Tensor:
    """L-inf PGD (Madry et al. 2018) with a uniform random start in the eps-ball.

    Untargeted: ascend ``CE(model(x'), y)`` (``loss="ce"``) or ``-margin(model(x'), y)``
    (``loss="margin"``). Targeted (``targeted=True`` with ``target``): descend
    ``CE(model(x'), target)`` or ascend ``margin(model(x'), target)``. ``generator`` seeds the random
    start, drawn on the generator's device (a CPU generator: on the CPU, then moved to ``x``'s device;
    the hot loops pass one on ``x``'s device). ``start_noise`` (uniform in [0, 1), ``x``'s shape)
    replaces that draw (a batch split over ranks: its rows of the global batch's draw). Returns a
    detached tensor on ``x``'s device.
    """
    _check_inputs(x, y, eps, "pgd")
    _check_steps(alpha, steps, "pgd")
    if loss not in ("ce", "margin"):
        raise ValueError(f"pgd: loss must be 'ce' or 'margin', got {loss!r}")
    if targeted:
        if target is None:
            raise ValueError("pgd: targeted=True needs target labels")
        if not isinstance(target, Tensor) or target.shape != y.shape or target.is_floating_point():
            raise ValueError(f"pgd: target must be an integer tensor of shape {tuple(y.shape)}")
    elif target is not None:
        raise ValueError("pgd: target given but targeted=False; pass targeted=True for a targeted attack")

    x = x.detach()
    labels = (target if targeted else y).to(device=x.device, dtype=torch.long)  # type: ignore[union-attr]

    def objective(logits: Tensor) -> Tensor:  # the quantity each step increases
        if loss == "ce":
            ce = F.cross_entropy(logits, labels, reduction="none")
            return -ce if targeted else ce
        m = margin(logits, labels)
        return m if targeted else -m

    with frozen_eval(model):
        if random_start:
            if start_noise is None:
                noise_device = "cpu" if generator is None else generator.device
                start_noise = torch.rand(x.shape, generator=generator, dtype=x.dtype, device=noise_device)
            x_adv = project(x + (2.0 * start_noise.to(x.device) - 1.0) * eps, x, eps)
        else:
            x_adv = x.clone()
        for _ in range(steps):
            grad = _input_grad(model, x_adv, objective)
            x_adv = project(x_adv + alpha * grad.sign(), x, eps)
    return x_adv.detach()


def cw_inf(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    alpha: float,
    steps: int,
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """CW-inf: untargeted L-inf PGD on the Carlini-Wagner margin loss."""
    return pgd(model, x, y, eps=eps, alpha=alpha, steps=steps, random_start=random_start,
               loss="margin", generator=generator)


# --------------------------------------------------------------------------------------------
# batched evaluation


def model_device(model: nn.Module) -> torch.device:
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")


def run_attack(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    name: Literal["clean", "fgsm", "pgd", "cw"],
    eps: float,
    alpha: float | None = None,
    steps: int | None = None,
    batch_size: int = 256,
    generator: torch.Generator | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> Tensor:
    """The model's predicted labels (int64, CPU) on ``name``-attacked versions of ``x``.

    ``x``/``y`` are usually CPU tensors; each batch is moved to the model's device. ``clean`` ignores
    ``eps``/``alpha``/``steps``; ``pgd`` and ``cw`` need ``alpha`` and ``steps``. Batches are attacked
    in order, drawing their random starts from ``generator`` in turn, so a seeded generator (with the
    same ``batch_size``) reproduces the result. ``progress(done, total)`` is called after each batch.
    """
    if name not in ("clean", "fgsm", "pgd", "cw"):
        raise ValueError(f"run_attack: unknown attack {name!r}; expected 'clean', 'fgsm', 'pgd' or 'cw'")
    _check_inputs(x, y, eps, f"run_attack({name})")
    if not (isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1):
        raise ValueError(f"run_attack: batch_size must be an integer >= 1, got {batch_size!r}")
    if name in ("pgd", "cw"):
        if alpha is None or steps is None:
            raise ValueError(f"run_attack: {name} needs alpha and steps")
        _check_steps(alpha, steps, f"run_attack({name})")

    device = model_device(model)
    total = x.shape[0]
    preds = torch.empty(total, dtype=torch.long)
    with frozen_eval(model):
        for start in range(0, total, batch_size):
            xb = x[start:start + batch_size].to(device)
            yb = y[start:start + batch_size].to(device)
            if name == "clean":
                xa = xb
            elif name == "fgsm":
                xa = fgsm(model, xb, yb, eps=eps)
            elif name == "pgd":
                xa = pgd(model, xb, yb, eps=eps, alpha=alpha, steps=steps, generator=generator)  # type: ignore[arg-type]
            else:
                xa = cw_inf(model, xb, yb, eps=eps, alpha=alpha, steps=steps, generator=generator)  # type: ignore[arg-type]
            _check_ball(xa, xb, eps, f"run_attack({name})")
            with torch.no_grad():
                preds[start:start + xb.shape[0]] = model(xa).argmax(dim=1).cpu()
            if progress is not None:
                progress(min(start + batch_size, total), total)
    return preds


# --------------------------------------------------------------------------------------------
# AutoAttack (reference implementation)


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _same_device(model_device: torch.device, wanted: torch.device) -> bool:
    if model_device.type != wanted.type:
        return False
    if wanted.type == "cpu" or wanted.index is None:
        return True
    return model_device.index == wanted.index


def autoattack_predictions(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    eps: float,
    version: Literal["standard", "fast"],
    batch_size: int,
    seed: int,
    device: str | torch.device,
) -> Tensor:
    """Predicted labels (int64, CPU) of ``model`` on the reference AutoAttack's L-inf examples.

    ``standard`` is ``pyautoattack.AutoAttack(version="standard")``: APGD-CE, APGD-T, FAB-T and
    Square, each run only on the points still robust. ``fast`` is ``version="custom"`` with
    ``APGD-CE + APGD-T`` at the standard settings (1 restart each): a cheaper subset whose accuracy
    is an upper bound on standard AutoAttack's and is NOT comparable to published AutoAttack numbers.

    With fewer than 10 classes the targeted attacks use ``C - 1`` target classes instead of 9 (the
    reference code would index past the last class); AutoAttack needs at least 4 classes (targeted
    DLR loss). ``model`` must already be on ``device``; ``x``/``y`` may stay on the CPU (batches are
    moved by the library). The library's log messages are kept off our stdout/stderr: its warnings
    (e.g. zero gradients) are re-logged on this module's logger. The global torch RNG, which the
    library reseeds with ``seed``, and any active ``sys.settrace`` hook, which its dynamic-defence
    check clears, are restored afterwards.
    """
    from pyautoattack import AutoAttack, checks

    _check_inputs(x, y, eps, "autoattack")
    if version not in ("standard", "fast"):
        raise ValueError(f"autoattack: version must be 'standard' or 'fast', got {version!r}")
    if not (isinstance(batch_size, int) and not isinstance(batch_size, bool) and batch_size >= 1):
        raise ValueError(f"autoattack: batch_size must be an integer >= 1, got {batch_size!r}")
    if not (isinstance(seed, int) and not isinstance(seed, bool)):
        raise ValueError(f"autoattack: seed must be an integer (None would seed from the clock), got {seed!r}")
    try:
        wanted = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"autoattack: invalid device {device!r}") from exc
    dev = model_device(model)
    if not _same_device(dev, wanted):
        raise ValueError(f"autoattack: the model is on {dev} but device is {wanted}; move the model first")

    x = x.detach().float().cpu()
    y = y.detach().long().cpu()
    if x.shape[0] == 0:
        return torch.empty(0, dtype=torch.long)

    aa_logger = logging.getLogger("auto-attack")
    collect = _Collect()
    saved_propagate, saved_trace = aa_logger.propagate, sys.gettrace()
    if dev.type == "cuda":
        fork_devices = [dev.index]
    elif torch.cuda.is_available() and torch.cuda.is_initialized():
        fork_devices = [torch.cuda.current_device()]  # the library also reseeds the CUDA RNG
    else:
        fork_devices = []
    stray = io.StringIO()
    with frozen_eval(model), torch.random.fork_rng(devices=fork_devices):
        with torch.no_grad():
            n_classes = model(x[:1].to(dev)).shape[1]
        if n_classes < 4:
            raise ValueError(f"autoattack: needs a model with at least 4 classes (targeted DLR loss), got {n_classes}")
        if y.min().item() < 0 or y.max().item() >= n_classes:
            raise ValueError(f"autoattack: labels must be in [0, {n_classes}), got [{y.min().item()}, {y.max().item()}]")
        n_targets = min(9, n_classes - 1)
        if version == "standard":
            adversary = AutoAttack(model, norm="Linf", eps=eps, version="standard", device=dev, seed=seed)
        else:
            adversary = AutoAttack(model, norm="Linf", eps=eps, version="custom", device=dev, seed=seed,
                                   attacks=list(AUTOATTACK_FAST_ATTACKS))
            adversary.apgd.n_restarts = 1  # as in the standard version (custom keeps 5)
            adversary.apgd_targeted.n_restarts = 1
        adversary.apgd_targeted.n_target_classes = n_targets
        adversary.fab.n_target_classes = n_targets
        for key in checks.funcs:  # the library's dynamic-defence counters are global and cumulative
            checks.funcs[key] = 0
        aa_logger.addHandler(collect)
        aa_logger.propagate = False
        try:
            with contextlib.redirect_stdout(stray):
                result = adversary.run_standard_evaluation(x, y, batch_size=batch_size)
        finally:
            sys.settrace(saved_trace)
            aa_logger.removeHandler(collect)
            aa_logger.propagate = saved_propagate
        x_adv = result[0] if isinstance(result, tuple) else result
        x_adv = x_adv.detach().float().cpu()
        _check_ball(x_adv, x, eps, f"autoattack({version})")
        preds = torch.empty(x.shape[0], dtype=torch.long)
        with torch.no_grad():
            for start in range(0, x.shape[0], batch_size):
                preds[start:start + batch_size] = model(x_adv[start:start + batch_size].to(dev)).argmax(1).cpu()
    for message in dict.fromkeys(collect.messages):
        log.warning("AutoAttack (%s): %s", version, message)
    if stray.getvalue().strip():
        log.debug("AutoAttack (%s) printed: %s", version, stray.getvalue().strip())
    return preds
