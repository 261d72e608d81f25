"""FERD's generator phase: Fairness-Aware Examples (method reference §2.1, §2.3, §2.4).

One call of :func:`synthesize_epoch` is one epoch of the generator phase (§2.1, §3 part A): a
freshly initialised generator G and trainable latents z are optimised for ``N_G`` steps on

    L_G = λ_bn·L_bn + λ_adv·L_adv + λ_oh·L_oh + λ_uni·L_uni                        (§2.3)

* ``L_bn``  = Σ_BN-layers ‖μ_batch − μ_running‖₂ + ‖σ²_batch − σ²_running‖₂ (DeepInversion; biased
  variance over N, H, W), measured by :class:`BNStatsLoss` hooks on the teacher's BatchNorm2d layers;
* ``L_oh``  = CE(f^T(x), y) with the labels y ~ Categorical(p) of §2.2;
* ``L_adv`` = −IKL(f^T(x), f^S(x)) (student frozen in eval mode; the generator *maximises* the
  student-teacher discrepancy);
* ``L_uni`` = KL(U ‖ softmax(f^T_{l+}(Z ⊙ (1 − M)))), the FAE term: Z = f^T_l(x), the robust-channel
  mask M comes from the information-bottleneck channel-noise fit of Kim et al. 2021
  (:func:`ib_fit`, :func:`robust_mask`, :func:`uniformity_loss`).

The batch kept for the epoch is the *un-augmented* generator output of the step with the lowest
L_G ("best_mem", §2.1); §2.4's pool appends it (the pool itself lives in the stage).

The teacher (and the student) stay frozen in eval mode throughout (``attacks.frozen_eval``): BN
uses and keeps its running statistics (hazard §7 #5); gradients reach x through the frozen nets.
All randomness derives from the one CPU ``torch.Generator`` passed in, so a seed reproduces an epoch
on a device: the once-per-epoch draws (generator weights, z, labels) come from it directly, the
per-step draws (augmentation offsets, IB noise) from ``ferd.runtime.device_generator`` (that same
generator on the CPU; a CUDA generator seeded from it on CUDA, so nothing is copied per step).

The hot loop does not synchronise with the host (docs/gpu.md): the kept batch, its step and loss
terms are selected on the device with ``torch.where``; non-finite losses are flagged on the device
and reported (first bad step) once the epoch's steps are done; everything is read back once per
epoch. Per-step progress carries the step count only. ``precision="bf16"`` runs the teacher and
student forward passes under CUDA autocast (the generator, losses and kept images stay float32).

The batch can be split over data-parallel ranks (``ferd.distributed``): see :func:`synthesize_epoch`.

Project choices: augmentation (``ferd.augment``) is a random shift (reflect pad + crop) and an
optional horizontal flip (off for Fashion-MNIST); the IB channel variance ``v = Var_{h,w}(Z)`` is
the biased (population) variance, floored at 1e-8.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ferd import distributed
from ferd.attacks import frozen_eval
from ferd.augment import apply_augment, augment, augment_params
from ferd.config import FaeConfig
from ferd.distributed import Shard
from ferd.errors import FerdError
from ferd.losses import capped_ce, ikl, uniform_kl
from ferd.models import build_generator, reset_generator
from ferd.runtime import Progress, autocast, device_generator, no_progress

__all__ = [
    "BNStatsLoss",
    "EpochSynthesis",
    "channel_variance",
    "ib_fit",
    "robust_mask",
    "synthesize_epoch",
    "uniformity_loss",
]

_VAR_FLOOR = 1e-8


# --------------------------------------------------------------------------------------------
# L_bn: BatchNorm statistics matching (DeepInversion)


class BNStatsLoss:
    """Forward hooks on every ``BatchNorm2d`` of ``model`` that measure L_bn.

    While :attr:`enabled`, each hooked BN layer records
    ``‖mean_{N,H,W}(input) − running_mean‖₂ + ‖var_{N,H,W}(input, biased) − running_var‖₂``;
    :meth:`collect` returns the sum over the recorded layers and clears the record. Layers without
    running statistics are skipped. Use as a context manager (hooks removed on exit) or call
    :meth:`remove`.
    """

    def __init__(self, model: nn.Module):
        self.enabled = True
        self._terms: list[Tensor] = []
        self._handles = [
            m.register_forward_hook(self._hook)
            for m in model.modules()
            if isinstance(m, nn.BatchNorm2d) and m.running_mean is not None and m.running_var is not None
        ]

    def _hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if not self.enabled:
            return
        a = inputs[0].float()  # a no-op in fp32; under bf16 autocast the statistics stay float32
        mean = a.mean(dim=(0, 2, 3))
        var = a.var(dim=(0, 2, 3), unbiased=False)
        self._terms.append(
            torch.linalg.vector_norm(mean - module.running_mean) + torch.linalg.vector_norm(var - module.running_var)
        )

    @property
    def num_layers(self) -> int:
        return len(self._handles)

    def collect(self) -> Tensor | None:
        """Σ of the terms recorded since the last call (``None`` if nothing was recorded); clears them."""
        terms, self._terms = self._terms, []
        if not terms:
            return None
        return torch.stack(terms).sum()

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._terms = []

    def __enter__(self) -> BNStatsLoss:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


class GlobalBNStatsLoss(BNStatsLoss):
    """L_bn over the global batch when the batch is split over ranks (``ferd.distributed``).

    Each hooked layer records its rows' per-channel sums of ``a − running_mean`` and of its square
    (shifted against cancellation) and their count; :meth:`collect` all-reduces every layer's sums at
    once (differentiably) and returns L_bn of the global batch, the same value on every rank. Give
    each rank ``L_bn / N`` as its loss share: the gradients reaching its rows are then those of L_bn.
    """

    def __init__(self, model: nn.Module):
        super().__init__(model)
        self._layers: list[nn.Module] = []

    def _hook(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if not self.enabled:
            return
        a = inputs[0].float() - module.running_mean[None, :, None, None]
        count = a.new_full((1,), a.numel() // a.shape[1])
        self._terms.append(torch.cat([a.sum(dim=(0, 2, 3)), a.pow(2).sum(dim=(0, 2, 3)), count]))
        self._layers.append(module)

    def collect(self) -> Tensor | None:
        terms, layers, self._terms, self._layers = self._terms, self._layers, [], []
        if not terms:
            return None
        sums = distributed.all_reduce_sum_grad(torch.cat(terms))
        total, offset = None, 0
        for module, local in zip(layers, terms, strict=True):
            c = (local.numel() - 1) // 2
            n = sums[offset + 2 * c]
            mean_s = sums[offset:offset + c] / n  # batch mean - running mean
            var = (sums[offset + c:offset + 2 * c] / n - mean_s * mean_s).clamp_min(0.0)
            term = torch.linalg.vector_norm(mean_s) + torch.linalg.vector_norm(var - module.running_var)
            total = term if total is None else total + term
            offset += local.numel()
        return total

    def remove(self) -> None:
        super().remove()
        self._layers = []


# --------------------------------------------------------------------------------------------
# the FAE term: IB channel noise (Kim et al. 2021), robust mask, uniformity loss


def channel_variance(z: Tensor) -> Tensor:
    """v = Var_{h,w}(Z) per sample and channel, ``[B, Ch]`` (biased variance, floored at 1e-8)."""
    return z.detach().float().var(dim=(2, 3), unbiased=False).clamp_min(_VAR_FLOOR)


def ib_fit(
    teacher: nn.Module,
    z: Tensor,
    y: Tensor,
    *,
    steps: int,
    lr: float,
    beta: float,
    generator: torch.Generator,
    matched_init: bool = False,
    shard: Shard | None = None,
) -> Tensor:
    """Fit the per-sample, per-channel noise scale σ = softplus(λ_r) on Z = f_l(x) (§2.3).

    λ_r starts at 0 and is optimised with Adam(lr) for ``steps`` steps on
    ``CE(f_{l+}(Z + σ ⊙ ε), y) + β · mean_{b,c} ½(v/σ² + log(σ²/v) − 1)``, ε ~ N(0, I) drawn each step
    from ``generator`` on its own device (pass one on ``z``'s device: ``ferd.runtime.device_generator``;
    a CPU generator with CUDA features costs a host draw and a copy per step), v = Var_{h,w}(Z). ``z``
    is detached and used as float32; the teacher is frozen in eval mode here. Returns σ, detached,
    ``[B, Ch, 1, 1]``.

    ``shard`` (the batch split over ranks, ``ferd.distributed``): ``z`` holds this rank's rows; ε is
    drawn for the global batch and sliced, and the loss is this rank's share of the global-batch mean,
    so every rank fits exactly the σ one process fits for these rows (σ is per sample).
    """
    if z.ndim != 4:
        raise ValueError(f"ib_fit: expected features [B, Ch, h, w], got {tuple(z.shape)}")
    z = z.detach().float()
    y = y.to(device=z.device, dtype=torch.long)
    v = channel_variance(z)[:, :, None, None]
    if matched_init:  # start at the KL optimum sigma^2 = v: the steps then move sigma by the CE term alone
        s0 = v.sqrt()
        lam = (s0 + torch.log(-torch.expm1(-s0))).to(z.dtype).requires_grad_(True)  # softplus^-1(sqrt(v))
    else:
        lam = torch.zeros(z.shape[0], z.shape[1], 1, 1, device=z.device, dtype=z.dtype, requires_grad=True)
    opt = torch.optim.Adam([lam], lr=lr)
    with frozen_eval(teacher), torch.enable_grad():
        for _ in range(steps):
            if shard is None:
                eps = torch.randn(z.shape, generator=generator, dtype=z.dtype, device=generator.device).to(z.device)
            else:
                eps = shard.rows(torch.randn((shard.total, *z.shape[1:]), generator=generator, dtype=z.dtype,
                                             device=generator.device)).to(z.device)
            sigma = F.softplus(lam)
            logits = teacher.forward_head(z + sigma * eps)
            var_n = sigma.pow(2)
            kl = 0.5 * (v / var_n + torch.log(var_n / v) - 1.0)
            if shard is None:
                loss = F.cross_entropy(logits, y) + beta * kl.mean()
            else:
                loss = (F.cross_entropy(logits, y, reduction="sum") / shard.total
                        + beta * kl.sum() / (shard.total * z.shape[1]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return F.softplus(lam).detach()


def robust_mask(
    sigma: Tensor, z: Tensor, threshold: Literal["global", "per-sample", "ratio"] = "global", *, batch_max: Tensor | None = None
) -> Tensor:
    """M = 1[σ² > max v], ``[B, Ch, 1, 1]`` float; the max over the whole batch and all channels
    (``global``, the reference code) or over each sample's channels (``per-sample``). ``batch_max``:
    the ``global`` limit when ``z`` holds only this rank's rows (the max over all ranks)."""
    v = channel_variance(z)
    if threshold == "global":
        limit = v.max() if batch_max is None else batch_max
    elif threshold == "per-sample":
        limit = v.amax(dim=1)[:, None, None, None]
    elif threshold == "ratio":
        limit = v[:, :, None, None]
    else:
        raise ValueError(f"robust_mask: threshold must be 'global' or 'per-sample', got {threshold!r}")
    s2 = sigma.detach().reshape(z.shape[0], z.shape[1], 1, 1).pow(2)
    return (s2 > limit).to(z.dtype)


def uniform_kl_per_sample(logits: Tensor) -> Tensor:
    """KL(U || softmax(logits)) per sample, [B]."""
    num_classes = logits.shape[1]
    return (-math.log(num_classes) - F.log_softmax(logits, dim=1)).mean(dim=1)


def image_priors(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """DeepInversion's image priors per sample: squared total variation and the squared l2 norm of the
    model's (normalised) input, each a mean over pixels, ``[B]`` each."""
    dh = (x[:, :, 1:, :] - x[:, :, :-1, :]).pow(2).flatten(1).mean(dim=1)
    dw = (x[:, :, :, 1:] - x[:, :, :, :-1]).pow(2).flatten(1).mean(dim=1)
    xn = model.normalize(x) if hasattr(model, "normalize") else x
    return dh + dw, xn.pow(2).flatten(1).mean(dim=1)


def uniformity_loss(teacher: nn.Module, z: Tensor, mask: Tensor) -> Tensor:
    """L_uni = KL(U ‖ softmax(f_{l+}(Z ⊙ (1 − M)))), batch mean; gradients flow through Z only."""
    return uniform_kl(teacher.forward_head(z * (1.0 - mask.detach())))


def global_ikl_share(teacher_logits: Tensor, student_logits: Tensor, sh: Shard, temperature: float = 100.0) -> Tensor:
    """This rank's share of ``ferd.losses.ikl`` over the global batch split by ``sh``.

    IKL's weighted term ¼·Σ w (Δt − Δs)² / Σ w normalises by the weights of the whole batch, so both
    sums are all-reduced (differentiably: the weights carry gradient); the shares (that term / N plus
    this rank's CE sum / B) add up to ``ikl`` of the global batch. Same formula as ``ferd.losses.ikl``.
    """
    q = F.softmax(teacher_logits / temperature, dim=1)
    w = q.unsqueeze(2) * q.unsqueeze(1)
    dt = teacher_logits.unsqueeze(2) - teacher_logits.unsqueeze(1)
    ds = student_logits.unsqueeze(2) - student_logits.unsqueeze(1)
    sums = distributed.all_reduce_sum_grad(torch.stack([(w * (dt - ds) ** 2).sum(), w.sum()]))
    ce = -(F.softmax(teacher_logits, dim=1).detach() * F.log_softmax(student_logits, dim=1)).sum(dim=1).sum()
    return 0.25 * sums[0] / sums[1] / distributed.world_size() + ce / sh.total


# --------------------------------------------------------------------------------------------
# one epoch of the generator phase


@dataclass
class EpochSynthesis:
    """The batch kept for one epoch (best_mem) and the generator-loss log of its step.

    ``x``: float32 ``[B, C, H, W]`` in [0, 1] (un-augmented, CPU); ``y``: int64 ``[B]``.
    ``log``: ``step`` (index of the kept step), ``total``, ``bn``, ``adv``, ``oh``, ``uni`` (loss terms
    of that step, unweighted; a skipped term is 0), ``teacher_acc`` (teacher's clean accuracy on the
    kept ``x`` w.r.t. ``y``), ``robust_channels`` (fraction of (sample, channel) pairs marked robust
    at the kept step; 0 when the IB fit is off).
    """

    x: Tensor
    y: Tensor
    log: dict[str, float] = field(default_factory=dict)
    gen_state: dict[str, Tensor] | None = None  # the generator after the epoch (fae.generator: carried)


_TERMS = ("bn", "adv", "oh", "uni", "tv", "l2")


def synthesize_epoch(
    teacher: nn.Module,
    student: nn.Module | None,
    p: Tensor,
    cfg: FaeConfig,
    *,
    image_shape: tuple[int, int, int],
    generator: torch.Generator,
    device: str | torch.device,
    labels: Tensor | None = None,
    progress: Progress = no_progress,
    epoch: int = 0,
    precision: str = "fp32",
    gen_state: dict | None = None,
) -> EpochSynthesis:
    """Run one epoch of FERD's generator phase (§2.1, §2.3) and return the kept batch.

    ``p`` is the class-sampling distribution (``[C]``): the labels are
    ``multinomial(p, B, replacement=True).sort()`` unless ``labels`` is given, in which case they are
    used as given (in their order) and set the batch size. ``student`` may be ``None`` (the L_adv
    term is then skipped, as it is when ``lambda_adv == 0``); ``lambda_uni == 0`` skips the IB fit.
    Raises ``FerdError`` when a loss term is not finite (naming the first bad step, once the steps
    are done). ``progress(task, step, steps, {})`` per step; the last call carries the kept step's
    ``loss`` and ``teacher_acc``.

    Under ``torch.distributed`` with more than one rank (``ferd.distributed``, docs/distributed.md)
    every rank calls this with the same arguments: the global batch's random numbers are drawn on
    every rank and each rank generates its rows (rank 0's labels); L_bn (:class:`GlobalBNStatsLoss`),
    IKL (:func:`global_ikl_share`), the generator's BatchNorm and the ``global`` IB maximum use the
    global batch; each rank's loss is its share of the global loss, the generator's gradients are
    summed; the terms are all-reduced each step so every rank keeps the same step; the kept batch is
    gathered, so every rank returns the same result (up to float reduction order, as one process).
    """
    channels, height, width = image_shape
    if height != width:
        raise ValueError(f"synthesize_epoch: the generator makes square images, got {height}x{width}")
    device = torch.device(device)
    teacher = teacher.to(device)
    if student is not None:
        student = student.to(device)

    gen = build_generator(nz=cfg.nz, ngf=cfg.ngf, image_size=height, channels=channels,
                          num_classes=len(p) if cfg.conditional else 0)
    reset_generator(gen, generator)
    if gen_state is not None:
        gen.load_state_dict(gen_state)
    gen = gen.to(device).train()
    z = torch.randn(cfg.batch_size if labels is None else labels.numel(), cfg.nz, generator=generator)
    if labels is None:
        probs = torch.as_tensor(p, dtype=torch.float64).cpu()
        y = torch.multinomial(probs, cfg.batch_size, replacement=True, generator=generator).sort().values
    else:
        y = torch.as_tensor(labels).to(dtype=torch.long).cpu()
        if y.ndim != 1 or y.numel() == 0:
            raise ValueError(f"synthesize_epoch: labels must be a non-empty 1-D tensor, got shape {tuple(y.shape)}")
    # split over ranks (ferd.distributed): every rank drew the global z and labels; rank 0's labels
    # are used, each rank generates its rows; the generator's BatchNorm is global
    sh = distributed.shard(y.numel(), "fae.batch_size") if distributed.active() else None
    sh_world = distributed.world_size()
    if sh is not None:
        y = distributed.broadcast_from_main(y)
        z = sh.rows(z)
        distributed.convert_batchnorm(gen, device)
    z = z.to(device).requires_grad_(True)
    y_dev = (y if sh is None else sh.rows(y)).to(device)
    step_generator = device_generator(generator, device)  # the CPU generator itself on the CPU
    opt = torch.optim.Adam(
        [{"params": gen.parameters(), "lr": cfg.lr_g}, {"params": [z], "lr": cfg.lr_z}], betas=(0.5, 0.999)
    )
    use_adv = student is not None and cfg.lambda_adv > 0
    use_uni = cfg.lambda_uni > 0
    weights = {"bn": cfg.lambda_bn, "adv": cfg.lambda_adv, "oh": cfg.lambda_oh, "uni": cfg.lambda_uni,
               "tv": cfg.lambda_tv, "l2": cfg.lambda_l2}
    use_priors = cfg.lambda_tv > 0 or cfg.lambda_l2 > 0
    per_image = cfg.select == "image"
    best_score = torch.full((y_dev.numel(),), math.inf, device=device)
    task = f"synthesis epoch {epoch}"

    def amp() -> contextlib.AbstractContextManager:
        return autocast(device, precision)

    def share(per_sample: Tensor) -> Tensor:
        """The batch mean of a per-sample term; split over ranks, this rank's share of the global mean."""
        return per_sample.mean() if sh is None else per_sample.sum() / sh.total

    # device-side selection state (best_mem) and non-finite flag: read once after the steps
    f64 = dict(dtype=torch.float64, device=device)
    best_loss = torch.full((), math.inf, device=device)
    best_x = torch.zeros(y_dev.numel(), channels, height, width, device=device)
    best_step = torch.zeros((), dtype=torch.long, device=device)
    best_terms = torch.zeros(len(_TERMS), **f64)  # bn, adv, oh, uni of the kept step
    best_robust = torch.zeros((), **f64)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)
    bad_values = torch.zeros(1 + len(_TERMS), **f64)  # total, bn, adv, oh, uni of the first bad step
    term_weights = torch.tensor([weights[name] for name in _TERMS], **f64) if sh is not None else None
    with contextlib.ExitStack() as stack:
        stack.enter_context(frozen_eval(teacher))
        if student is not None:
            stack.enter_context(frozen_eval(student))
        bn_loss = stack.enter_context(BNStatsLoss(teacher) if sh is None else GlobalBNStatsLoss(teacher))
        stack.enter_context(torch.enable_grad())
        for step in range(cfg.steps):
            x = gen(z, y_dev)  # an unconditional generator ignores the labels
            if sh is None:
                xa = augment(x, cfg.augment_pad, cfg.augment_flip, step_generator)
            else:  # the global batch's draws, this rank's rows
                aug = augment_params(sh.total, cfg.augment_pad, cfg.augment_flip, step_generator)
                xa = apply_augment(x, cfg.augment_pad, tuple(sh.rows(a) for a in aug))
            bn_loss.enabled = True
            bn_loss.collect()  # drop anything recorded outside this step
            with amp():
                feats = teacher.forward_features(xa)
                t = teacher.forward_head(feats).float()
            bn_loss.enabled = False
            l_bn = bn_loss.collect()
            zero = t.new_zeros(())
            if sh is not None and l_bn is not None:
                l_bn = l_bn / sh_world  # the global L_bn, this rank's share
            if cfg.oh_confidence < 1.0:  # class-faithful, not over-confident: no pull once p_y >= kappa
                l_oh = share(capped_ce(t, y_dev, cfg.oh_confidence))
            else:
                l_oh = F.cross_entropy(t, y_dev) if sh is None else share(F.cross_entropy(t, y_dev, reduction="none"))
            terms = {"bn": zero if l_bn is None else l_bn, "adv": zero, "oh": l_oh, "uni": zero, "tv": zero, "l2": zero}
            # per-image score for fae.select: image (the per-sample terms; L_bn and L_adv are batch terms)
            score = cfg.lambda_oh * F.cross_entropy(t.detach(), y_dev, reduction="none") if per_image else None
            if use_adv:
                with amp():
                    s = student(xa).float()
                terms["adv"] = -ikl(t, s) if sh is None else -global_ikl_share(t, s, sh)
            robust = torch.zeros((), **f64)
            if use_uni:
                with amp():
                    sigma = ib_fit(teacher, feats, y_dev, steps=cfg.ib_steps, lr=cfg.ib_lr, beta=cfg.ib_beta,
                                   generator=step_generator, matched_init=cfg.ib_threshold == "ratio", shard=sh)
                batch_max = None
                if sh is not None and cfg.ib_threshold == "global":  # the max over every rank's rows
                    batch_max = distributed.all_reduce_(channel_variance(feats).max().clone(), "max")
                mask = robust_mask(sigma, feats, cfg.ib_threshold, batch_max=batch_max)
                robust = mask.float().mean().double() if sh is None else mask.float().sum().double() / (sh.total * mask.shape[1])
                with amp():
                    uni_i = uniform_kl_per_sample(teacher.forward_head(feats * (1.0 - mask.detach())).float())
                terms["uni"] = share(uni_i)
                if per_image:
                    score = score + cfg.lambda_uni * uni_i.detach()
            if use_priors:
                tv_i, l2_i = image_priors(teacher, x)
                terms["tv"], terms["l2"] = share(tv_i), share(l2_i)
                if per_image:
                    score = score + cfg.lambda_tv * tv_i.detach() + cfg.lambda_l2 * l2_i.detach()
            loss = sum(weights[name] * terms[name] for name in _TERMS)
            with torch.no_grad():
                total = loss.detach()
                values = torch.stack([terms[name].detach().double() for name in _TERMS])
                if sh is not None:  # the global terms from every rank's shares: every rank keeps the same step
                    summed = distributed.all_reduce_(torch.cat([values, robust.reshape(1)]))
                    values, robust = summed[:-1], summed[-1]
                    total = (values * term_weights).sum()
                step_values = torch.cat([total.double().reshape(1), values])
                newly_bad = ~torch.isfinite(step_values).all() & (first_bad < 0)
                first_bad = torch.where(newly_bad, step, first_bad)
                bad_values = torch.where(newly_bad, step_values, bad_values)
                better = total < best_loss  # strict: the first of equal losses stays (NaN never wins)
                best_loss = torch.where(better, total, best_loss)
                if per_image:  # each image from its own best step (L_bn, a batch term, does not enter the score)
                    better_i = score < best_score
                    best_score = torch.where(better_i, score, best_score)
                    best_x = torch.where(better_i[:, None, None, None], x.detach(), best_x)
                else:
                    best_x = torch.where(better, x.detach(), best_x)
                best_step = torch.where(better, step, best_step)
                best_terms = torch.where(better, values, best_terms)
                best_robust = torch.where(better, robust, best_robust)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if sh is not None:  # generator gradients: the sum of the shares' gradients (z's rows are this rank's)
                distributed.all_reduce_grads_(gen.parameters())
            opt.step()
            if step + 1 < cfg.steps:
                progress(task, step + 1, cfg.steps, {})

        # the one read-back of the epoch
        summary = torch.cat([first_bad.double().reshape(1), bad_values, best_step.double().reshape(1),
                             best_loss.double().reshape(1), best_terms, best_robust.reshape(1)]).tolist()
        bad_step = int(summary[0])
        if bad_step >= 0:
            bad_total, bad_terms = summary[1], dict(zip(_TERMS, summary[2:2 + len(_TERMS)], strict=True))
            bad = [name for name in _TERMS if not math.isfinite(bad_terms[name])]
            if bad:
                shown = ", ".join(f"L_{name} = {bad_terms[name]}" for name in bad)
                raise FerdError(
                    f"synthesis epoch {epoch}, step {bad_step}: non-finite generator loss term ({shown}); "
                    "check the teacher checkpoint (NaN/inf weights or BN statistics) and lower fae.lr_g / fae.lr_z"
                )
            raise FerdError(f"synthesis epoch {epoch}, step {bad_step}: the total generator loss is not finite ({bad_total})")
        kept = summary[2 + len(_TERMS):]
        best_log = {"step": kept[0], "total": kept[1], **dict(zip(_TERMS, kept[2:2 + len(_TERMS)], strict=True)),
                    "robust_channels": kept[-1]}
        with torch.no_grad():
            if sh is not None:  # the kept batch, gathered from every rank's rows
                best_x = distributed.all_gather_rows(best_x, sh)
            pred = teacher(best_x).argmax(dim=1).cpu()
    best_log["teacher_acc"] = float((pred == y).float().mean())
    progress(task, cfg.steps, cfg.steps, {"loss": best_log["total"], "teacher_acc": best_log["teacher_acc"]})
    return EpochSynthesis(x=best_x.float().cpu().clamp_(0.0, 1.0), y=y, log=best_log,
                          gen_state={k: v.detach().cpu().clone() for k, v in gen.state_dict().items()})
