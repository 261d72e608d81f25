"""Robust distillation of the student on the synthetic pool (method reference §2.6, §2.7, §3 part C).

Per student step (§3 C): sample a batch x_F uniformly from the eligible pool, augment it (random
shift, optional flip), take the frozen teacher's clean logits t = T(x_F), craft UTAEs x_U against
the **current student** (§2.5, :func:`ferd.utae.craft_utae`, the reference code / RSLAD convention;
§9 #3; ``distill.adversary`` swaps in the baselines' plain PGD or DFHL's high-entropy examples, see
:mod:`ferd.adversaries`), and take one SGD step on (§2.6, project default §9 #4)::

    L_stu = λ1 · L(T(x_F), S(x_F)) + λ2 · L(T(x_F), S(x_U)),   L = KL (default) or IKL/DKL

plus, with ``distill.boundary`` (beyond the paper; params.yaml's default ``hee+disagree``),
λ_b · L(T(x_H), S(x_H)) on examples x_H crafted near a class boundary from the first ``boundary_fraction``
of the batch (:func:`boundary_rows`, :func:`ferd.adversaries.craft_boundary`), from distillation epoch
``boundary_from_epoch`` on.

With ``distill.ema`` > 0 (beyond the paper) the saved student is an exponential moving average of the
trained student's weights and BatchNorm statistics (:func:`update_average`; Polyak averaging, as in
the weight-averaged robust models of Gowal et al. 2020), not the last iterate; the run state keeps
both, so a resumed run averages on exactly as an uninterrupted one.

Optimisation (§2.7): SGD with momentum and weight decay; CosineAnnealingLR with T_max = total
epochs, stepped once per epoch from epoch 1 *including the warm-up epochs* (§7 #6), so the student
starts at the rate the schedule has after ``warmup`` steps.

Pool growth (DESIGN ``distill.schedule``): student epoch k (global epoch warmup + k) trains on the
images synthesised in epochs ≤ warmup + k. ``staged``: the cached pool already holds every epoch;
``interleaved``: a ``synthesize(epoch, student)`` callback appends that epoch's batch first. With
``distill.pool_growth: false`` (staged only, beyond the paper) every epoch trains on the whole
cached pool: in ``staged`` the growth only emulates the paper's alternation (docs/results.md measures
what training on all of it from the start changes).

A fixed class-balanced holdout of synthetic images that are not in the pool (the probe set of
``ferd probe``, never trained on) gives a per-epoch synthetic clean / PGD-10 curve against the
teacher's labels. No test set is ever touched here.

The step loop does not synchronise with the host (docs/gpu.md): the pool images (and cached UTAE
perturbations) stay on the compute device when they fit in ``POOL_DEVICE_FRACTION`` of its free
memory (else batches are gathered on the CPU into pinned buffers and copied without blocking);
batch indices, augmentation and UTAE start noise are drawn there (``ferd.runtime.device_generator``:
the CPU generators themselves on the CPU, so CPU runs are unchanged); losses and agreement counts
are summed on the device in float64 and read, with a non-finite-loss flag, once per epoch. The pool
grows in a preallocated buffer (:meth:`Pool.append`), and run-state checkpoints store it as
append-only parts. ``precision="bf16"`` runs the teacher and student forward passes (and the
adversary's) under CUDA autocast.
"""

from __future__ import annotations

import contextlib
import copy
import math
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import torch
from torch import Tensor, nn

from ferd import distributed
from ferd.adversaries import craft_adversary, craft_boundary, needs_teacher_on_adversary
from ferd.attacks import frozen_eval, run_attack
from ferd.augment import apply_augment, augment_params
from ferd.config import DistillConfig, UtaeConfig
from ferd.errors import FerdError
from ferd.losses import soft_label_loss
from ferd.runtime import Progress, autocast, device_generator, no_progress, torch_generator

__all__ = [
    "LOG_COLUMNS",
    "DistillState",
    "Pool",
    "average_decay",
    "student_loss",
    "train_student",
    "update_average",
]

#: Columns of every per-epoch log row (all floats; NaN for holdout metrics with an empty holdout).
LOG_COLUMNS = (
    "epoch",
    "lr",
    "loss",
    "loss_clean",
    "loss_adv",
    "loss_boundary",
    "pool_size",
    "holdout_clean_acc",
    "holdout_pgd_acc",
    "train_agreement",
    "train_agreement_adv",
)

#: The loss parts summed over an epoch's steps (and kept for the first non-finite step), in this order.
_LOSS_PARTS = ("loss", "loss_clean", "loss_adv", "loss_boundary")

#: PGD of the per-epoch holdout curve: 10 steps of eps/4 (random start from a fixed seeded generator).
HOLDOUT_PGD_STEPS = 10

#: The pool (at its final size) and the cached UTAE perturbations are kept on a CUDA device when they
#: take at most this fraction of its free memory; otherwise batches come from pinned CPU memory.
POOL_DEVICE_FRACTION = 0.25


# --------------------------------------------------------------------------------------------
# loss


def student_loss(
    teacher_logits_clean: Tensor, s_clean: Tensor, s_adv: Tensor, cfg: DistillConfig, teacher_logits_adv: Tensor | None = None,
    *, shard: distributed.Shard | None = None, boundary: tuple[Tensor, Tensor] | None = None,
    boundary_shard: distributed.Shard | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """``λ1·L(T(x_F), S(x_F)) + λ2·L(T(x_F), S(x_U))`` (§2.6); parts ``loss``, ``loss_clean``, ``loss_adv``,
    ``loss_boundary`` (detached).

    ``teacher_logits_adv`` replaces T(x_F) as the adversarial term's target (DFHL's HEEs are labelled
    by the teacher's answer on the HEE itself, §8). ``boundary`` = (T(x_H), S(x_H)) adds the project's
    boundary term ``λ_b·L(T(x_H), S(x_H))`` on high-entropy examples x_H (``distill.boundary: hee``,
    beyond the paper; its part is 0 without it). ``shard`` (the batch split over ranks): the logits
    are this rank's rows and everything returned is this rank's *share* of the global-batch value
    (the shares of all ranks add up to it; IKL's batch-wide weight normalisation is all-reduced);
    ``boundary_shard`` is the same for the HEE rows (:func:`boundary_rows`), required with both.
    """
    t = teacher_logits_clean.detach()
    t_adv = t if teacher_logits_adv is None else teacher_logits_adv.detach()

    def term(target: Tensor, s: Tensor, sh: distributed.Shard | None) -> Tensor:
        if sh is None:
            return soft_label_loss(cfg.loss, target, s, cfg.ikl_temperature, cfg.kl_temperature)
        return _loss_share(cfg, target, s, sh)

    clean = term(t, s_clean, shard)
    adv = term(t_adv, s_adv, shard)
    loss = cfg.lambda_clean * clean + cfg.lambda_adv * adv
    bnd = torch.zeros((), dtype=loss.dtype, device=loss.device)
    if boundary is not None:
        if (shard is None) != (boundary_shard is None):
            raise ValueError("student_loss: a sharded batch needs boundary_shard for its HEE rows (and only then)")
        bnd = term(boundary[0].detach(), boundary[1], boundary_shard)
        loss = loss + cfg.lambda_boundary * bnd
    return loss, {"loss": loss.detach(), "loss_clean": clean.detach(), "loss_adv": adv.detach(),
                  "loss_boundary": bnd.detach()}


def boundary_rows(cfg: DistillConfig, sh: distributed.Shard | None) -> tuple[int, distributed.Shard | None]:
    """How many of this process's batch rows get a boundary HEE (``distill.boundary``; 0 when off), and the
    shard of the global HEE batch they form.

    The HEE rows are the first ``round(boundary_fraction · n)`` (at least one) of each process's ``n``
    rows, so the global HEE batch is the concatenation of every rank's (in one process: the first rows
    of the batch; the batch is already a uniform draw, so the first rows are a uniform subsample).
    """
    if cfg.boundary == "none" or cfg.lambda_boundary == 0:
        return 0, None

    def count(n: int) -> int:
        return max(1, round(cfg.boundary_fraction * n))

    if sh is None:
        return count(cfg.batch_size), None
    sizes = tuple(count(n) for n in sh.sizes)
    start = sum(sizes[:distributed.rank()])
    mine = sizes[distributed.rank()]
    return mine, distributed.Shard(start, start + mine, sum(sizes), sizes)


def _loss_share(cfg: DistillConfig, t: Tensor, s: Tensor, sh: distributed.Shard) -> Tensor:
    """This rank's share of ``soft_label_loss`` over the global batch (KL and CE are batch means)."""
    if cfg.loss == "ikl":
        from ferd.fae import global_ikl_share

        return global_ikl_share(t, s, sh, cfg.ikl_temperature)
    return soft_label_loss(cfg.loss, t, s, cfg.ikl_temperature, cfg.kl_temperature) * (sh.n / sh.total)


# --------------------------------------------------------------------------------------------
# pool


class _Storage:
    """Preallocated rows behind one or more :class:`Pool` views; ``n`` rows are filled."""

    def __init__(self, x: Tensor, y: Tensor, epoch: Tensor, n: int) -> None:
        self.x, self.y, self.epoch, self.n = x, y, epoch, n


@dataclass
class Pool:
    """The append-only synthetic pool (§2.4): images, labels, and the synthesis epoch (≥ 1) of each.

    ``x`` may live on the compute device; ``y`` and ``epoch`` stay where they were created (the CPU
    in ``distill``), so index bookkeeping never synchronises with a device.
    """

    x: Tensor
    y: Tensor
    epoch: Tensor
    _storage: _Storage | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        n = self.x.shape[0] if self.x.ndim else -1
        if self.x.ndim != 4 or not self.x.is_floating_point():
            raise ValueError(f"Pool.x must be a float tensor [N, C, H, W], got {tuple(self.x.shape)} {self.x.dtype}")
        if self.y.shape != (n,) or self.epoch.shape != (n,):
            raise ValueError(f"Pool: y and epoch must have shape [{n}], got {tuple(self.y.shape)} and {tuple(self.epoch.shape)}")
        if self.y.is_floating_point() or self.epoch.is_floating_point():
            raise ValueError("Pool: y and epoch must be integer tensors")
        if n and int(self.epoch.min()) < 1:
            raise ValueError("Pool: synthesis epochs start at 1")

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def eligible(self, upto_epoch: int) -> Tensor:
        """Indices (int64, ascending) of the images synthesised in epochs ≤ ``upto_epoch``."""
        return torch.nonzero(self.epoch <= upto_epoch, as_tuple=False).flatten()

    def append(self, x: Tensor, y: Tensor, epoch: int, reserve: int = 0) -> Pool:
        """A new pool with batch ``(x, y)`` of synthesis epoch ``epoch`` appended (self is unchanged).

        The rows go into spare capacity of a preallocated buffer shared with ``self`` (no copy of the
        pool); without room (or when ``self`` is not the buffer's newest view) a new buffer is made
        for ``max(len + len(x), len + reserve, 2·len)`` rows: pass ``reserve`` = the rows still to
        come (this batch included) to allocate the final size once.
        """
        x = x.detach().to(device=self.x.device, dtype=self.x.dtype)
        if x.shape[1:] != self.x.shape[1:]:
            raise ValueError(f"Pool.append: images of shape {tuple(x.shape[1:])}, the pool holds {tuple(self.x.shape[1:])}")
        y = y.detach().to(device=self.y.device, dtype=self.y.dtype)
        if y.shape != x.shape[:1]:
            raise ValueError(f"Pool.append: {x.shape[0]} images but labels of shape {tuple(y.shape)}")
        n, k = len(self), x.shape[0]
        st = self._storage
        if st is None or st.n != n or st.x.shape[0] < n + k:
            cap = max(n + k, n + reserve, 2 * n)
            st = _Storage(torch.empty((cap, *self.x.shape[1:]), dtype=self.x.dtype, device=self.x.device),
                          torch.empty(cap, dtype=self.y.dtype, device=self.y.device),
                          torch.empty(cap, dtype=self.epoch.dtype, device=self.epoch.device), n)
            st.x[:n], st.y[:n], st.epoch[:n] = self.x, self.y, self.epoch
        st.x[n:n + k], st.y[n:n + k] = x, y
        st.epoch[n:n + k] = int(epoch)
        st.n = n + k
        return Pool(st.x[:n + k], st.y[:n + k], st.epoch[:n + k], _storage=st)

    def to(self, device: torch.device | str) -> Pool:
        """The pool with its images on ``device`` (``self`` when they are there already)."""
        if self.x.device == torch.device(device):
            return self
        return Pool(self.x.to(device), self.y, self.epoch)


# --------------------------------------------------------------------------------------------
# --------------------------------------------------------------------------------------------
# training loop


@dataclass
class DistillState:
    """Everything needed to continue training after ``epoch`` student epochs (a snapshot; CPU copies).

    ``epoch``: student epochs done (k; the global epoch is ``warmup + k``). ``rng``: the states of the
    generators of the loop (``sample``, ``augment``, ``utae``; CPU generators: on CUDA each epoch's
    device generators are seeded from them). ``pool``: the pool as it is now (it grows under the
    interleaved schedule; a view, its images possibly on the device, never changed by later appends).
    ``ema``: the weight average's state dict (``distill.ema`` > 0; None when off).
    """

    student: dict[str, Tensor]
    optimizer: dict[str, Any]
    scheduler: dict[str, Any]
    epoch: int
    rng: dict[str, Tensor]
    log: list[dict[str, float]] = field(default_factory=list)
    pool: Pool | None = None
    ema: dict[str, Tensor] | None = None

    def to_dict(self) -> dict[str, Any]:
        """Nested dicts / lists / tensors for :class:`ferd.runstate.RunState`; the pool as append-only
        parts (one per synthesis epoch, ``ferd.runstate.row_parts``), written once each."""
        from ferd.runstate import row_parts

        out = {f.name: getattr(self, f.name) for f in fields(self)}
        if self.pool is not None:
            columns = {"x": self.pool.x, "y": self.pool.y, "epoch": self.pool.epoch}
            out["pool"] = row_parts("pool", columns, self.pool.epoch)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DistillState:
        """The inverse of :meth:`to_dict` after a :class:`ferd.runstate.RunState` round trip (parts loaded)."""
        from ferd.runstate import join_parts

        data = dict(data)
        if data.get("pool") is not None:
            data["pool"] = Pool(**join_parts(data["pool"]))
        return cls(**data)


@torch.no_grad()
def update_average(averaged: nn.Module, model: nn.Module, decay: float) -> None:
    """``averaged ← decay · averaged + (1 − decay) · model`` over the parameters and floating-point buffers
    (BatchNorm's running statistics); integer buffers (BatchNorm's batch count) are copied.

    The two modules must have the same state-dict layout (``averaged`` is a deep copy of ``model``).
    """
    for avg, cur in zip(averaged.state_dict().values(), model.state_dict().values(), strict=True):
        if avg.is_floating_point():
            avg.lerp_(cur, 1.0 - decay)
        else:
            avg.copy_(cur)


def average_decay(ema: float, updates_before: int) -> float:
    """The decay of the ``updates_before + 1``-th average update: ``min(ema, (1 + n) / (10 + n))``, the
    warm-up of TensorFlow's ExponentialMovingAverage, so the first steps do not anchor the average to the
    random initialisation (0.1 for the first update, ``ema`` after ``(10·ema − 1) / (1 − ema)`` updates)."""
    return min(ema, (1.0 + updates_before) / (10.0 + updates_before))


def _cpu_copy(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.detach().cpu().clone()
    if isinstance(obj, dict):
        return {k: _cpu_copy(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_cpu_copy(v) for v in obj)
    return copy.deepcopy(obj)


def _to_device(obj: Any, device: torch.device) -> Any:
    if isinstance(obj, Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: _to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return type(obj)(_to_device(v, device) for v in obj)
    return obj


def mix_batch(x: Tensor, cfg: DistillConfig, generator: torch.Generator) -> Tensor:
    """Mix the first ``mix_fraction`` of the batch with a random partner from the batch.

    ``mixup``: the convex combination λ·x + (1 − λ)·x_partner; ``cutmix``: a box of area 1 − λ of the
    partner pasted at a random place; λ ~ U(0, 1) per image. No label is mixed: the teacher labels the
    mixture (the student's target is T(mixed image)), so a mixture of a coat and a pullover carries the
    teacher's own answer between the two classes. Every draw comes from ``generator`` on the batch's
    device, vectorised (no host sync).
    """
    n = x.shape[0]
    k = int(round(cfg.mix_fraction * n))
    if k == 0 or cfg.mix == "none":
        return x
    dev = generator.device
    partner = torch.randint(n, (k,), generator=generator, device=dev).to(x.device)
    lam = torch.rand(k, generator=generator, device=dev).to(x.device, x.dtype)
    out = x.clone()
    if cfg.mix == "mixup":
        w = lam[:, None, None, None]
        out[:k] = w * x[:k] + (1 - w) * x[partner]
        return out
    h, w = x.shape[2:]
    side = (1 - lam).sqrt()  # the box covers (1 - λ) of the image
    bh, bw = (side * h).long(), (side * w).long()
    top = (torch.rand(k, generator=generator, device=dev).to(x.device) * (h - bh + 1)).long()
    left = (torch.rand(k, generator=generator, device=dev).to(x.device) * (w - bw + 1)).long()
    rows = torch.arange(h, device=x.device)[None, :]
    cols = torch.arange(w, device=x.device)[None, :]
    in_rows = (rows >= top[:, None]) & (rows < (top + bh)[:, None])
    in_cols = (cols >= left[:, None]) & (cols < (left + bw)[:, None])
    box = (in_rows[:, :, None] & in_cols[:, None, :])[:, None]  # [k, 1, h, w]
    out[:k] = torch.where(box, x[partner], x[:k])
    return out


def _fits_on_device(nbytes: int, device: torch.device) -> bool:
    """Whether ``nbytes`` may live on ``device`` (always on the CPU; on CUDA: POOL_DEVICE_FRACTION of free memory)."""
    if device.type != "cuda":
        return True
    free, _total = torch.cuda.mem_get_info(device)
    return nbytes <= POOL_DEVICE_FRACTION * free


class _PinnedGather:
    """Batches of rows of CPU tensors, gathered into pinned buffers and copied to the device without blocking.

    Two buffers per tensor alternate; before a buffer is refilled, the event recorded after its last
    copy is waited for (long done by then). The batch indices come from the device, so this path
    costs one small device-to-host copy per step (the price of a pool that does not fit).
    """

    def __init__(self, sources: list[Tensor], rows: int, device: torch.device) -> None:
        self.sources, self.device = sources, device
        self.buffers = [[torch.empty((rows, *t.shape[1:]), dtype=t.dtype).pin_memory() for t in sources] for _ in range(2)]
        self.events: list[Any] = [None, None]
        self.turn = 0

    def __call__(self, index: Tensor) -> list[Tensor]:
        slot, self.turn = self.turn, 1 - self.turn
        if self.events[slot] is not None:
            self.events[slot].synchronize()
        index = index.cpu()
        out = []
        for src, buf in zip(self.sources, self.buffers[slot], strict=True):
            staged = buf[:index.numel()]
            torch.index_select(src, 0, index, out=staged)
            out.append(staged.to(self.device, non_blocking=True))
        self.events[slot] = torch.cuda.Event()
        self.events[slot].record()
        return out


@torch.no_grad()
def _logits(model: nn.Module, x: Tensor, device: torch.device, batch_size: int = 256) -> Tensor:
    return torch.cat([model(x[i:i + batch_size].to(device)).cpu() for i in range(0, x.shape[0], batch_size)])


def train_student(
    student: nn.Module,
    teacher: nn.Module,
    pool: Pool,
    cfg: DistillConfig,
    utae: UtaeConfig,
    *,
    total_epochs: int,
    warmup: int,
    eps: float,
    seed: int,
    device: torch.device | str,
    cached_delta: Tensor | None = None,
    holdout: Tensor | None = None,
    synthesize: Callable[[int, nn.Module], tuple[Tensor, Tensor]] | None = None,
    state: DistillState | None = None,
    on_epoch_end: Callable[[DistillState], None] | None = None,
    progress: Progress = no_progress,
    precision: str = "fp32",
) -> DistillState:
    """Distil ``teacher`` into ``student`` for student epochs k = 1..(total_epochs − warmup) (§3 C).

    ``pool``: CPU pool; epoch k trains on its images of synthesis epoch ≤ warmup + k. ``holdout``:
    synthetic images never trained on (the probe set, float [H,C,H,W]); the student's clean and PGD
    agreement with the teacher's label on them is logged every epoch (NaN without a holdout).
    ``synthesize(warmup + k, student)`` (interleaved schedule) returns that epoch's ``(x, y)``, which
    is appended before epoch k. ``cached_delta`` (float [N,C,H,W], x_U − x_F against the teacher,
    from ``gen-utae``) is required by ``cfg.utae_init == "cached"``: the UTAE then starts from the
    cached perturbed image under the same augmentation and runs ``cfg.cached_steps`` steps.
    ``state`` continues a run from a snapshot; ``on_epoch_end(state)`` receives a snapshot after
    every epoch. ``progress("distill", step, total, {})`` after every step, with ``epoch`` and the
    epoch's mean ``loss`` at its last step. A non-finite loss raises ``FerdError`` naming the epoch
    and its first bad step, once that epoch's steps are done. The teacher is used frozen in eval
    mode; the student is left in eval mode, holding the weight average when ``cfg.ema`` > 0 (the
    holdout curve is then the average's too; ``state.student`` stays the trained iterate, ``state.ema``
    the average). ``precision="bf16"``: CUDA autocast of the forward passes. Returns the final state.

    Under ``torch.distributed`` (``ferd.distributed``, more than one rank) the student trains with DDP
    and global BatchNorm: every rank draws the global batch (indices, augmentation, mixing, UTAE start
    noise) as one process would and takes its rows (:func:`ferd.distributed.shard` of
    ``cfg.batch_size``) for the teacher, the adversary and the student step; the per-epoch sums are
    reduced over the ranks once per epoch. The pool, holdout curve and snapshots are the same on
    every rank.
    """
    device = torch.device(device)
    if not 0 <= warmup < total_epochs:
        raise FerdError(f"distill: need 0 <= warmup ({warmup}) < total epochs ({total_epochs})")
    if len(pool) == 0:
        raise FerdError("distill: the pool is empty; run synth-fae first")
    cached = cfg.utae_init == "cached"
    if cached:
        if cached_delta is None:
            raise FerdError("distill.utae_init is 'cached' but no UTAE perturbations were given; run gen-utae "
                            "or set distill.utae_init: noise")
        if synthesize is not None:
            raise FerdError("distill.utae_init 'cached' needs gen-utae's perturbation for every pool image, but the "
                            "interleaved schedule synthesises new images; use distill.utae_init: noise")
        if cached_delta.shape != pool.x.shape:
            raise FerdError(f"distill: cached UTAE perturbations have shape {tuple(cached_delta.shape)} but the pool "
                            f"holds {tuple(pool.x.shape)}; rerun gen-utae on this pool")
    student_epochs = total_epochs - warmup
    sh = distributed.shard(cfg.batch_size, "distill.batch_size") if distributed.active() else None
    world = distributed.world_size()
    bnd_rows, bnd_shard = boundary_rows(cfg, sh)
    bnd_global = None if bnd_shard is None else (bnd_shard.start, bnd_shard.total)  # craft_boundary's global_rows
    if bnd_rows and cfg.boundary_from_epoch > student_epochs:
        raise FerdError(f"distill.boundary_from_epoch {cfg.boundary_from_epoch} is after the last distillation epoch "
                        f"({student_epochs}); lower it or set distill.boundary: none")

    student.to(device)
    teacher.to(device)
    distributed.convert_batchnorm(student, device)  # global over the ranks (nothing in one process)
    optimizer = torch.optim.SGD(student.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_epochs)
    gens = {name: torch_generator(seed, f"distill/{name}") for name in ("sample", "augment", "utae")}

    if state is None:
        with warnings.catch_warnings():  # stepping before any optimizer.step() is intended here (§7 #6)
            warnings.filterwarnings("ignore", message=".*lr_scheduler.step.*", category=UserWarning)
            for _ in range(warmup):
                scheduler.step()
        log: list[dict[str, float]] = []
        start_k = 1
    else:
        student.load_state_dict(state.student)
        optimizer.load_state_dict(_to_device(state.optimizer, device))
        scheduler.load_state_dict(state.scheduler)
        for name, g in gens.items():
            g.set_state(state.rng[name])
        if state.pool is not None:
            pool = state.pool
        log = [dict(row) for row in state.log]
        start_k = state.epoch + 1
    averaged = None  # distill.ema: the weight average (a frozen copy, never trained)
    if cfg.ema > 0:
        averaged = copy.deepcopy(student).eval().requires_grad_(False)
        if state is not None:
            if state.ema is None:
                raise ValueError("train_student: distill.ema > 0 but the state to continue has no weight average")
            averaged.load_state_dict(state.ema)
    net = distributed.data_parallel(student, device)  # the student's training passes (the student itself in one process)

    # where the pool lives: on the device when it fits (at its final size), else pinned staging
    rows_per_epoch = len(pool) / max(1, int(pool.epoch.max()))
    final_rows = len(pool) + (student_epochs * rows_per_epoch if synthesize is not None else 0)
    row_bytes = pool.x[:1].nelement() * pool.x.element_size() * (2 if cached else 1)
    resident = _fits_on_device(int(final_rows * row_bytes), device)
    if resident:
        pool = pool.to(device)
        if cached:
            cached_delta = cached_delta.to(device)
    else:
        pool = pool.to("cpu")
        gather = _PinnedGather([pool.x, *([cached_delta] if cached else [])], cfg.batch_size, device)

    def amp() -> contextlib.AbstractContextManager:
        return autocast(device, precision)

    total_steps = student_epochs * cfg.steps
    last = state
    with frozen_eval(teacher):
        hold_x = None if holdout is None or len(holdout) == 0 else holdout.to(device=device, dtype=pool.x.dtype)
        hold_t = None if hold_x is None else _logits(teacher, hold_x, device).argmax(dim=1)
        for k in range(start_k, student_epochs + 1):
            epoch = warmup + k
            if synthesize is not None:
                student.eval()  # the generator phase sees the student in eval mode (§3 A)
                xs, ys = synthesize(epoch, student)
                pool = pool.append(xs, ys.cpu(), epoch, reserve=(student_epochs - k + 1) * xs.shape[0])
                if not resident:
                    gather.sources[0] = pool.x
            bnd_on = bnd_rows > 0 and k >= cfg.boundary_from_epoch  # distill.boundary_from_epoch: plain before it
            upto = epoch if cfg.pool_growth else total_epochs  # pool_growth false: the whole cached pool throughout
            idx = torch.nonzero(pool.epoch <= upto, as_tuple=False).flatten()
            if idx.numel() == 0:
                raise FerdError(f"distill: epoch {epoch} has no training images (pool epochs <= {upto})")
            lr = optimizer.param_groups[0]["lr"]
            # this epoch's per-step generators on the device (the CPU generators themselves on the CPU)
            dev_gens = {name: device_generator(g, device) for name, g in gens.items()}
            sample_device = dev_gens["sample"].device
            n_idx, idx = idx.numel(), idx.to(sample_device)
            # float64 sums on the device: the _LOSS_PARTS, agree, agree_adv (equal to Python-float sums)
            sums = torch.zeros(len(_LOSS_PARTS) + 2, dtype=torch.float64, device=device)
            first_bad = torch.full((), -1, dtype=torch.long, device=device)
            bad_parts = torch.zeros(len(_LOSS_PARTS), dtype=torch.float64, device=device)  # the first bad step's
            seen = 0
            for step in range(1, cfg.steps + 1):
                b = idx[torch.randint(n_idx, (cfg.batch_size,), generator=dev_gens["sample"], device=sample_device)]
                if resident:
                    x_raw = pool.x[b]
                    delta = cached_delta[b] if cached else None
                else:
                    x_raw, *rest = gather(b)
                    delta = rest[0] if cached else None
                aug = augment_params(x_raw.shape[0], cfg.augment_pad, cfg.augment_flip, dev_gens["augment"])
                x_f = apply_augment(x_raw, cfg.augment_pad, aug).to(device)
                x_f = mix_batch(x_f, cfg, dev_gens["augment"])  # the batch itself when distill.mix is none
                if sh is not None:  # the global batch was drawn and augmented alike on every rank: this rank's rows
                    x_f = sh.rows(x_f)
                with torch.no_grad(), amp():
                    t = teacher(x_f).float()
                with amp():
                    if cached:
                        start = apply_augment((x_raw + delta.to(x_raw.dtype)).clamp(0.0, 1.0), cfg.augment_pad, aug)
                        start = start if sh is None else sh.rows(start)
                        x_u = craft_adversary(student, x_f, t, cfg, utae, eps=eps, generator=dev_gens["utae"],
                                              start=start.to(device), steps=cfg.cached_steps)
                    elif sh is not None and cfg.adversary in ("utae", "pgd"):  # the global batch's start noise, these rows
                        g = dev_gens["utae"]
                        draw = torch.randn if cfg.adversary == "utae" else torch.rand
                        noise = sh.rows(draw((sh.total, *x_f.shape[1:]), generator=g, dtype=x_f.dtype,
                                             device=g.device)).to(x_f.device)
                        if cfg.adversary == "utae":
                            x_u = craft_adversary(student, x_f, t, cfg, utae, eps=eps, generator=g,
                                                  start=x_f + utae.init_noise * noise)
                        else:
                            x_u = craft_adversary(student, x_f, t, cfg, utae, eps=eps, generator=g, start_noise=noise)
                    else:
                        x_u = craft_adversary(student, x_f, t, cfg, utae, eps=eps, generator=dev_gens["utae"])
                t_adv = None
                if needs_teacher_on_adversary(cfg.adversary):
                    with torch.no_grad(), amp():
                        t_adv = teacher(x_u).float()
                bnd = None
                if bnd_on:  # distill.boundary: x_H from this rank's first rows, labelled by the teacher on them
                    with amp():
                        x_h = craft_boundary(cfg.boundary, student, teacher, x_f[:bnd_rows], steps=cfg.boundary_steps,
                                             step_size=cfg.boundary_step_size * eps,
                                             global_rows=bnd_global, hee_share=cfg.boundary_hee_share)
                    with torch.no_grad(), amp():
                        t_h = teacher(x_h).float()
                net.train()
                with amp():
                    s_clean = net(x_f).float()
                    s_adv = net(x_u).float()
                    if bnd_on:
                        bnd = (t_h, net(x_h).float())
                loss, parts = student_loss(t, s_clean, s_adv, cfg, t_adv, shard=sh, boundary=bnd, boundary_shard=bnd_shard)
                if sh is not None:  # DDP averages the ranks' gradients: N x the share gives the global loss's
                    loss = loss * world
                with torch.no_grad():
                    step_parts = torch.stack([parts[n] for n in _LOSS_PARTS]).double()
                    newly_bad = ~torch.isfinite(loss) & (first_bad < 0)
                    first_bad = torch.where(newly_bad, step, first_bad)
                    bad_parts = torch.where(newly_bad, step_parts, bad_parts)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                if averaged is not None:
                    update_average(averaged, student, average_decay(cfg.ema, (k - 1) * cfg.steps + step - 1))
                with torch.no_grad():
                    t_pred = t.argmax(dim=1)
                    t_pred_adv = t_pred if t_adv is None else t_adv.argmax(dim=1)
                    sums += torch.stack([*(parts[n] for n in _LOSS_PARTS),
                                         (s_clean.argmax(dim=1) == t_pred).float().sum(),
                                         (s_adv.argmax(dim=1) == t_pred_adv).float().sum()]).double()
                seen += x_f.shape[0]
                if step < cfg.steps:
                    progress("distill", (k - 1) * cfg.steps + step, total_steps, {})
            # the one read-back of the epoch
            summary = torch.cat([first_bad.double().reshape(1), bad_parts, sums])
            if sh is not None:
                summary, seen = _global_summary(summary), cfg.steps * sh.total
            summary = summary.tolist()
            if summary[0] >= 0:
                values = dict(zip(_LOSS_PARTS, summary[1:1 + len(_LOSS_PARTS)], strict=True))
                bad = next((n for n in _LOSS_PARTS[1:] if not math.isfinite(values[n])), "loss")
                raise FerdError(f"distill: non-finite {bad} ({values[bad]}) at epoch {epoch}, step {int(summary[0])}; "
                                "lower distill.lr or check the pool for NaN images")
            sums = dict(zip((*_LOSS_PARTS, "agree", "agree_adv"), summary[1 + len(_LOSS_PARTS):], strict=True))
            progress("distill", k * cfg.steps, total_steps, {"epoch": float(epoch), "loss": sums["loss"] / cfg.steps})
            scheduler.step()

            student.eval()
            saved = student if averaged is None else averaged  # the model the stage will save
            if hold_t is not None:
                clean_pred = run_attack(saved, hold_x, hold_t, name="clean", eps=eps)
                pgd_pred = run_attack(saved, hold_x, hold_t, name="pgd", eps=eps, alpha=eps / 4,
                                      steps=HOLDOUT_PGD_STEPS, generator=torch_generator(seed, "distill/holdout-pgd"))
                hold_clean = float((clean_pred == hold_t).float().mean())
                hold_pgd = float((pgd_pred == hold_t).float().mean())
            else:
                hold_clean = hold_pgd = math.nan
            log.append({
                "epoch": float(epoch),
                "lr": float(lr),
                "loss": sums["loss"] / cfg.steps,
                "loss_clean": sums["loss_clean"] / cfg.steps,
                "loss_adv": sums["loss_adv"] / cfg.steps,
                "loss_boundary": sums["loss_boundary"] / cfg.steps,
                "pool_size": float(idx.numel()),
                "holdout_clean_acc": hold_clean,
                "holdout_pgd_acc": hold_pgd,
                "train_agreement": sums["agree"] / seen,
                "train_agreement_adv": sums["agree_adv"] / seen,
            })
            last = DistillState(
                student=_cpu_copy(student.state_dict()),
                optimizer=_cpu_copy(optimizer.state_dict()),
                scheduler=copy.deepcopy(scheduler.state_dict()),
                epoch=k,
                rng={name: g.get_state() for name, g in gens.items()},
                log=[dict(row) for row in log],
                pool=pool,
                ema=None if averaged is None else _cpu_copy(averaged.state_dict()),
            )
            if on_epoch_end is not None:
                on_epoch_end(last)
    distributed.revert_batchnorm(student)
    if averaged is not None:
        student.load_state_dict(averaged.state_dict())
    student.eval()
    assert last is not None  # at least one student epoch ran, or ``state`` had finished them all
    return last


def _global_summary(summary: Tensor) -> Tensor:
    """An epoch's ``[first bad step, its _LOSS_PARTS, the sums of the _LOSS_PARTS and agreement counts]``
    over all ranks: the earliest bad step of any rank (with that rank's parts), the sums of the loss
    shares and of the counts."""
    head = 1 + len(_LOSS_PARTS)  # the first bad step and its parts: taken from one rank, not summed
    rows = distributed.all_gather_stack(summary)
    bad = rows[:, 0]
    out = rows.sum(dim=0)
    hit = torch.nonzero(bad >= 0, as_tuple=False).flatten()
    if hit.numel():
        first = hit[torch.argmin(bad[hit])]
        out[:head] = rows[first, :head]
    else:
        out[:head] = rows[0, :head]
    return out


def run_distill(
    teacher: nn.Module,
    pool_arrays: dict[str, Any],
    params: Any,
    info: Any,
    *,
    cached_delta: Tensor | None,
    device: torch.device | str,
    probe_data: Any = None,
    resume: dict[str, Any] | None = None,
    save_state: Callable[[dict[str, Any]], None] | None = None,
    progress: Progress = no_progress,
) -> tuple[nn.Module, list[dict[str, Any]]]:
    """The ``distill`` stage: build the student, run ``train_student`` with the configured schedule.

    ``staged``: the cached pool (all ``fae.epochs`` epochs). ``interleaved``: the pool holds the
    warm-up epochs; before every student epoch a :class:`ferd.synthesis.Synthesizer` continues the
    synthesis loop (re-probe, re-weight, append) against the live student. Returns the student (eval
    mode) and one log row per student epoch, with the class proportions that epoch's images used.
    ``probe_data`` (:class:`ferd.synthesis.ProbeData`): the synthetic holdout of the per-epoch curve,
    and what the interleaved schedule's reweighting signal and diagnostics read.

    ``save_state(state)`` receives, after every student epoch, a plain dict with the training state
    (and the synthesis loop's, interleaved) that ``resume=state`` continues from, bit for bit.
    """
    from ferd.models import build_model
    from ferd.runtime import derive_seed
    from ferd.synthesis import SynthesisState, Synthesizer, state_from_pool

    cfg, fae = params.distill, params.fae
    c, h, _w = info.image_shape
    torch.manual_seed(derive_seed(params.seed, "distill/student-init"))
    student = build_model(cfg.arch, num_classes=info.num_classes, in_channels=c, image_size=h, width=cfg.width)
    pool = Pool(x=torch.as_tensor(pool_arrays["x"]), y=torch.as_tensor(pool_arrays["y"]),
                epoch=torch.as_tensor(pool_arrays["epoch"]))
    synth_state = state_from_pool(pool_arrays)
    state = None
    if resume is not None:
        state = DistillState.from_dict(resume["distill"])
        if resume.get("synthesis") is not None:
            synth_state = SynthesisState(**resume["synthesis"])
    synthesize = None
    if cfg.schedule == "interleaved":
        synth = Synthesizer(teacher, fae, params.probe, params.reweight, num_classes=info.num_classes,
                            image_shape=tuple(info.image_shape), eps=params.data.eps, seed=params.seed, device=device,
                            state=synth_state, progress=progress, precision=params.runtime.precision,
                            probe_data=probe_data)

        def synthesize(epoch: int, live_student: nn.Module) -> tuple[Tensor, Tensor]:
            x, y, _row = synth.epoch(epoch, live_student)
            return x, y

    def on_epoch_end(snapshot: DistillState) -> None:
        if save_state is not None:
            save_state({"distill": snapshot.to_dict(),
                        "synthesis": asdict(synth_state) if synthesize is not None else None})

    final = train_student(
        student, teacher, pool, cfg, params.utae, total_epochs=fae.epochs, warmup=fae.warmup, eps=params.data.eps,
        seed=params.seed, device=device, cached_delta=cached_delta,
        holdout=None if probe_data is None else probe_data.holdout_x, synthesize=synthesize, state=state,
        on_epoch_end=on_epoch_end, progress=progress, precision=params.runtime.precision,
    )
    rows = []
    for row in final.log:
        out = {k: (int(v) if k in ("epoch", "pool_size") else v) for k, v in row.items()}
        epoch = int(row["epoch"])
        if epoch <= len(synth_state.p_history):
            out.update({f"p_{n}": v for n, v in zip(info.class_names, synth_state.p_history[epoch - 1], strict=True)})
        rows.append(out)
    return student.eval(), rows
