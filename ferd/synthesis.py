"""FERD's per-epoch synthesis loop (method reference §3, parts A and B; §2.4 pool).

Each epoch: a fresh generator makes a batch of Fairness-Aware Examples whose labels are drawn from
the class distribution p (``ferd.fae.synthesize_epoch``); the teacher's per-class fragility D is
re-measured on the kept batch (``ferd.probe.probe_teacher``, PGD on the frozen teacher, §9 #5:
best_mem, not the last augmented batch); p is re-weighted from D (``ferd.reweight``); the batch is
appended to the pool (append-only, §9 #6).

The same :class:`Synthesizer` serves both schedules:
- ``staged`` (``synth-fae`` runs all E epochs up front): the generator's student-disagreement term
  L_adv needs a student that does not exist yet, so a cheap *shadow student* stands in: it is
  trained after every epoch to mimic the teacher on the clean pool so far (KL, ``fae.shadow_steps``
  SGD steps). This is where ``staged`` deviates from the paper, whose L_adv sees the live,
  adversarially distilled student.
- ``interleaved`` (the paper's alternation): ``synth-fae`` makes only the warm-up epochs and
  ``distill`` calls :meth:`Synthesizer.epoch` with the live student before each student epoch.

The pool of ``synthesize_pool`` is one preallocated buffer filled epoch by epoch (no growing
``torch.cat``); its run-state checkpoints reference each epoch's rows as a part written once
(``ferd.runstate.row_parts``), so a save costs one batch, not the whole pool.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from ferd.config import FaeConfig, ProbeConfig, ReweightConfig
from ferd.runtime import Progress, derive_seed, no_progress, torch_generator


@dataclass
class SynthesisState:
    """What the loop carries from epoch to epoch (and what the pool file records)."""

    p: Tensor  # float64 [C]: the distribution the *next* epoch samples labels from
    D: Tensor | None = None  # float64 [C]: the (smoothed) fragility behind p
    p_history: list[list[float]] = field(default_factory=list)  # p used by each epoch so far
    D_history: list[list[float]] = field(default_factory=list)  # D measured after each epoch
    rows: list[dict[str, float]] = field(default_factory=list)  # per-epoch log
    gen_state: dict[str, Tensor] | None = None  # the generator carried across epochs (fae.generator: carried)


@dataclass(frozen=True)
class ProbeData:
    """What the reweighting signals and diagnostics read besides the pool (from ``ferd probe``'s file).

    ``holdout_x``: the class-balanced synthetic probe set, never trained on; ``holdout_t``: the
    teacher's labels of it (argmax). ``real_fragility``: the teacher's per-class fragility D on real
    images (``probe.real_split``; None when off); ``real_images``: those real images and labels, for
    the student's real-image diagnostic. Real images are diagnostics only: they never reach training
    (the ``oracle`` signal, an upper bound, is labelled as such).
    """

    holdout_x: Tensor
    holdout_t: Tensor
    real_fragility: Tensor | None = None
    real_images: tuple[Tensor, Tensor] | None = None


def probe_data(arrays: dict[str, Any], data: Any, probe: ProbeConfig, seed: int, *, real_images: bool) -> ProbeData:
    """:class:`ProbeData` from the probe file's arrays; with ``real_images`` (only the ``student``
    signal's diagnostic needs them) the probe's real images are loaded again (the same seeded subset)."""
    from ferd.data import class_balanced_subset, load_split

    images = None
    if real_images and "real_D" in arrays and probe.real_split != "none":
        real = class_balanced_subset(load_split(data, probe.real_split), probe.real_per_class, seed=seed)
        images = (real.images(), real.y)
    return ProbeData(
        holdout_x=torch.as_tensor(arrays["x"]), holdout_t=torch.as_tensor(arrays["clean_pred"]).long(),
        real_fragility=torch.as_tensor(arrays["real_D"]) if "real_D" in arrays else None, real_images=images,
    )


class Synthesizer:
    """Runs synthesis epochs against a frozen teacher; see the module docstring."""

    def __init__(
        self,
        teacher: nn.Module,
        fae: FaeConfig,
        probe: ProbeConfig,
        reweight: ReweightConfig,
        *,
        num_classes: int,
        image_shape: tuple[int, int, int],
        eps: float,
        seed: int,
        device: Any,
        state: SynthesisState,
        progress: Progress = no_progress,
        precision: str = "fp32",
        probe_data: ProbeData | None = None,
    ) -> None:
        from ferd.errors import ConfigError

        self.teacher, self.fae, self.probe, self.reweight = teacher, fae, probe, reweight
        self.num_classes, self.image_shape, self.eps, self.seed = num_classes, image_shape, eps, seed
        self.device, self.state, self.progress, self.precision = device, state, progress, precision
        self.data = probe_data
        if reweight.method != "uniform" and reweight.signal == "oracle" and (
                probe_data is None or probe_data.real_fragility is None):
            raise ConfigError("reweight.signal: oracle needs the teacher's fragility on real images; set "
                              "probe.real_split to train")
        if reweight.method != "uniform" and reweight.signal == "student" and probe_data is None:
            raise ConfigError("reweight.signal: student needs the probe set as its synthetic holdout; run `ferd probe`")

    def _attack(self, model: nn.Module, x: Tensor, y: Tensor, name: str) -> Any:
        from ferd.probe import probe_teacher

        return probe_teacher(model, x, y, self.num_classes, eps=self.eps, alpha=self.probe.step_size * self.eps,
                             steps=self.probe.steps, mode="all", generator=torch_generator(self.seed, name))

    def signal(self, epoch: int, result: Any, y: Tensor, student: nn.Module | None) -> tuple[Tensor, Tensor, Tensor | None]:
        """``(D measured this epoch, classes measured, real-image diagnostic to rank it against or None)``.

        ``teacher`` (paper, §2.2): the teacher's fragility on the epoch's kept batch (all samples, or
        with ``probe.fragility: agreed`` those it labels right), against its fragility on real images.
        ``student`` (beyond the paper): the student's fragility (PGD margin w.r.t. the teacher's label)
        on the synthetic holdout, against the student's fragility on real images; the shadow student
        in ``staged``, the live one in ``interleaved``. ``oracle`` (a diagnostic upper bound, never a
        method): the teacher's fragility on real images itself.
        """
        signal, data = self.reweight.signal, self.data
        real_teacher = data.real_fragility if data is not None else None
        if signal == "oracle":
            return real_teacher, torch.ones(self.num_classes, dtype=torch.bool), real_teacher
        if signal == "student" and student is not None:
            res = self._attack(student, data.holdout_x, data.holdout_t, f"synth-fae/student-probe-{epoch}")
            present = torch.bincount(data.holdout_t, minlength=self.num_classes) > 0
            diagnostic = None
            if data.real_images is not None:
                diagnostic = self._attack(student, *data.real_images, f"synth-fae/student-real-{epoch}").D
            return res.D, present, diagnostic
        counted = (result.clean_pred == y) if self.probe.fragility == "agreed" else torch.ones_like(y, dtype=torch.bool)
        return result.D, torch.bincount(y[counted], minlength=self.num_classes) > 0, real_teacher

    def epoch(self, epoch: int, student: nn.Module | None) -> tuple[Tensor, Tensor, dict[str, float]]:
        """Synthesise epoch ``epoch`` (1-based) against ``student``; update p; return (x, y, log row).

        Each epoch's randomness is derived from (seed, epoch), so a resumed run repeats it exactly.
        """
        from ferd.distributed import broadcast_from_main
        from ferd.fae import synthesize_epoch
        from ferd.probe import probe_teacher, rank_correlation
        from ferd.reweight import class_proportions, fill_absent, smooth_fragility

        st = self.state
        p_used = st.p
        kept = synthesize_epoch(
            self.teacher, student, p_used.float(), self.fae, image_shape=self.image_shape,
            generator=torch_generator(self.seed, f"synth-fae/epoch-{epoch}"), device=self.device,
            progress=self.progress, epoch=epoch, precision=self.precision,
            gen_state=st.gen_state if self.fae.generator == "carried" else None,
        )
        if self.fae.generator == "carried":
            st.gen_state = kept.gen_state
        result = probe_teacher(
            self.teacher, kept.x, kept.y, self.num_classes, eps=self.eps, alpha=self.probe.step_size * self.eps,
            steps=self.probe.steps, mode=self.probe.fragility,
            generator=torch_generator(self.seed, f"synth-fae/probe-{epoch}"),
        )
        x, y = kept.x.detach().cpu(), kept.y.cpu()
        measured, present, diagnostic = self.signal(epoch, result, y, student)
        st.D = smooth_fragility(st.D, fill_absent(measured, present, st.D), self.reweight.momentum)
        st.p = class_proportions(st.D, self.reweight)
        st.D, st.p = broadcast_from_main(st.D), broadcast_from_main(st.p)  # split over ranks: rank 0 decides
        st.p_history.append([float(v) for v in p_used])
        st.D_history.append([float(v) for v in st.D])
        row = {"epoch": float(epoch), **{k: float(v) for k, v in kept.log.items() if k != "step"}}
        row["probe_adv_acc"] = float((result.adv_pred == y).double().mean())
        counts = torch.bincount(y, minlength=self.num_classes)
        row["classes_present"] = float((counts > 0).sum())
        row["rank_corr"] = rank_correlation(st.D, diagnostic) if diagnostic is not None else math.nan
        for c in range(self.num_classes):
            row[f"agree_{c}"] = float(result.per_class_agreement[c]) if counts[c] > 0 else math.nan
        st.rows.append(row)
        return x, y, row


def train_shadow(
    shadow: nn.Module,
    teacher: nn.Module,
    pool_x: Tensor,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    generator: torch.Generator,
    device: Any,
    adv_steps: int = 0,
    eps: float = 0.0,
) -> None:
    """``steps`` SGD steps of KL(teacher ‖ shadow) on pool images (the staged L_adv stand-in).

    With ``adv_steps`` > 0 the shadow trains like the student (§2.6, project default §9 #4):
    5/6·KL(T(x)‖S(x)) + 1/6·KL(T(x)‖S(x_adv)), x_adv a KL-PGD of ``adv_steps`` steps of ε/4 in the
    ε-ball against the shadow, so that its per-class robust error (the ``student`` reweighting signal)
    is the error of a robustly trained student.
    """
    from ferd.attacks import frozen_eval
    from ferd.losses import kl_div
    from ferd.utae import craft_utae

    if steps == 0 or len(pool_x) == 0:
        return
    opt = torch.optim.SGD(shadow.parameters(), lr=lr, momentum=0.9)
    shadow.train()
    with frozen_eval(teacher):
        for _ in range(steps):
            idx = torch.randint(len(pool_x), (min(batch_size, len(pool_x)),), generator=generator)
            x = pool_x[idx].to(device)
            with torch.no_grad():
                t = teacher(x)
            if adv_steps:
                x_adv = craft_utae(shadow, x, t, eps=eps, alpha=eps / 4, steps=adv_steps, gamma=0.0, init_noise=0.001,
                                   generator=generator)
                shadow.train()
                loss = 5 / 6 * kl_div(t, shadow(x)) + 1 / 6 * kl_div(t, shadow(x_adv))
            else:
                loss = kl_div(t, shadow(x))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    shadow.eval()


def synthesize_pool(
    teacher: nn.Module,
    fae: FaeConfig,
    probe: ProbeConfig,
    reweight: ReweightConfig,
    *,
    epochs: int,
    p0: Tensor,
    num_classes: int,
    image_shape: tuple[int, int, int],
    eps: float,
    seed: int,
    device: Any,
    resume: dict[str, Any] | None = None,
    save_state: Callable[[dict[str, Any]], None] | None = None,
    progress: Progress = no_progress,
    precision: str = "fp32",
    probe_data: ProbeData | None = None,
) -> tuple[Tensor, Tensor, Tensor, SynthesisState]:
    """The ``synth-fae`` stage: ``epochs`` synthesis epochs with a shadow student; (x, y, epoch, state).

    ``save_state(state)`` receives a dict after every epoch (the pool so far as ``pool``: a list of
    ``ferd.runstate.Part``, one per epoch; the loop state, the shadow student, its sampling
    generator); ``resume=state`` continues from it bit for bit (each epoch's own randomness is
    derived from (seed, epoch)); a loaded state holds each part as a dict of tensors.

    Under ``torch.distributed`` every rank runs this loop: each epoch's batch is split over the ranks
    (``ferd.fae.synthesize_epoch``), the kept batch, pool, probe and shadow student are the same on
    every rank (p and the shadow's weights come from rank 0); pass ``save_state`` on rank 0 only.
    """
    from ferd.distributed import broadcast_module_
    from ferd.models import build_model
    from ferd.runstate import join_parts, row_parts

    c, h, _w = image_shape
    torch.manual_seed(derive_seed(seed, "synth-fae/shadow-init"))
    shadow = build_model(fae.shadow_arch, num_classes=num_classes, in_channels=c, image_size=h,
                         width=fae.shadow_width).to(device).eval()
    state = SynthesisState(p=p0.double().clone())
    g_shadow = torch_generator(seed, "synth-fae/shadow")
    pool = _Rows(image_shape, capacity=max(epochs, 0) * fae.batch_size)  # one kept batch per epoch
    start = 1
    if resume is not None:
        state = SynthesisState(**resume["synthesis"])
        shadow.load_state_dict(resume["shadow"])
        g_shadow.set_state(resume["g_shadow"])
        if resume["pool"]:
            done = join_parts(resume["pool"])
            pool.append(done["x"], done["y"], done["epoch_of_image"])
        start = resume["epoch"] + 1
    synth = Synthesizer(teacher, fae, probe, reweight, num_classes=num_classes, image_shape=image_shape, eps=eps,
                        seed=seed, device=device, state=state, progress=progress, precision=precision,
                        probe_data=probe_data)
    for epoch in range(start, epochs + 1):
        x, y, _row = synth.epoch(epoch, shadow)
        pool.append(x, y, torch.full((len(y),), epoch, dtype=torch.long))
        train_shadow(shadow, teacher, pool.x, steps=fae.shadow_steps, batch_size=fae.batch_size,
                     adv_steps=fae.shadow_adv_steps, eps=eps,
                     lr=fae.shadow_lr, generator=g_shadow, device=device)
        broadcast_module_(shadow)  # split over ranks: every rank's L_adv sees rank 0's shadow (nothing in one process)
        progress("synthesis epochs", epoch, epochs, {"teacher_acc": _row.get("teacher_acc", float("nan"))})
        if save_state is not None:
            columns = {"x": pool.x, "y": pool.y, "epoch_of_image": pool.epoch}
            save_state({"epoch": epoch, "pool": row_parts("pool", columns, pool.epoch),
                        "synthesis": asdict(state), "shadow": shadow.state_dict(), "g_shadow": g_shadow.get_state()})
    return pool.x, pool.y, pool.epoch, state


class _Rows:
    """The synth-fae pool: preallocated CPU rows (images, labels, epochs) filled batch by batch.

    ``x``/``y``/``epoch`` are views of the filled rows. Appending beyond the capacity (not the case
    for one batch of ``fae.batch_size`` per epoch) doubles the buffers, so appends stay linear.
    """

    def __init__(self, image_shape: tuple[int, ...], capacity: int) -> None:
        self._x = torch.empty(capacity, *image_shape)
        self._y = torch.empty(capacity, dtype=torch.long)
        self._e = torch.empty(capacity, dtype=torch.long)
        self.n = 0

    def append(self, x: Tensor, y: Tensor, epoch: Tensor) -> None:
        k = len(y)
        if self.n + k > len(self._y):
            cap = max(2 * len(self._y), self.n + k)
            self._x = torch.cat([self._x[:self.n], torch.empty(cap - self.n, *self._x.shape[1:])])
            self._y = torch.cat([self._y[:self.n], torch.empty(cap - self.n, dtype=torch.long)])
            self._e = torch.cat([self._e[:self.n], torch.empty(cap - self.n, dtype=torch.long)])
        self._x[self.n:self.n + k] = x
        self._y[self.n:self.n + k] = y
        self._e[self.n:self.n + k] = epoch
        self.n += k

    @property
    def x(self) -> Tensor:
        return self._x[:self.n]

    @property
    def y(self) -> Tensor:
        return self._y[:self.n]

    @property
    def epoch(self) -> Tensor:
        return self._e[:self.n]


def pool_arrays(x: Tensor, y: Tensor, epoch: Tensor, state: SynthesisState) -> dict[str, Any]:
    """The pool file's datasets: images, labels, synthesis epoch, p/D per epoch, the per-epoch log."""
    num_classes = state.p.numel()
    arrays: dict[str, Any] = {
        "x": x.numpy(), "y": y.numpy(), "epoch": epoch.numpy(),
        "p_history": torch.tensor(state.p_history, dtype=torch.float64).reshape(-1, num_classes).numpy(),
        "D_history": torch.tensor(state.D_history, dtype=torch.float64).reshape(-1, num_classes).numpy(),
        "p_next": state.p.numpy(),
    }
    if state.D is not None:
        arrays["D_next"] = state.D.numpy()
    for key in sorted({k for row in state.rows for k in row}):
        arrays[f"log_{key}"] = torch.tensor([row.get(key, float("nan")) for row in state.rows], dtype=torch.float64).numpy()
    return arrays


def state_from_pool(arrays: dict[str, Any]) -> SynthesisState:
    """Continue the synthesis loop where a pool file left it (the interleaved schedule)."""
    return SynthesisState(
        p=torch.as_tensor(arrays["p_next"], dtype=torch.float64),
        D=torch.as_tensor(arrays["D_next"], dtype=torch.float64) if "D_next" in arrays else None,
        p_history=[list(map(float, r)) for r in arrays["p_history"]],
        D_history=[list(map(float, r)) for r in arrays["D_history"]],
        rows=[{k[4:]: float(arrays[k][i]) for k in arrays if k.startswith("log_")} for i in range(len(arrays["p_history"]))],
    )


def synthesis_rows(state: SynthesisState, class_names: list[str]) -> list[dict[str, Any]]:
    """One CSV row per synthesis epoch: the log plus p (the proportions that epoch sampled from) per class."""
    rows = []
    for row, p in zip(state.rows, state.p_history, strict=True):
        out = {k: (int(v) if k == "epoch" else v) for k, v in row.items()}
        out.update({f"p_{name}": v for name, v in zip(class_names, p, strict=True)})
        rows.append(out)
    return rows
