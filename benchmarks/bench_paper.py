"""Per-step cost of FERD at a paper preset's real shapes, and the projected hours of every preset.

    python benchmarks/bench_paper.py                        # every preset in configs/, on the best device
    python benchmarks/bench_paper.py --preset cifar10-resnet18 --device cuda --precision bf16
    python benchmarks/bench_paper.py --device cpu --batch 8 --steps 2   # CPU: batch 8, scaled to B
    python benchmarks/bench_paper.py --quick                # tiny shapes: a smoke test of this script

For each preset (configs/*.yaml over params.yaml; the teacher, student and generator are built
at the preset's architectures with random weights: timing only, no checkpoint or dataset needed)
it times the library's own functions at the preset's shapes on the chosen device:

- synthesis step (``ferd.fae.synthesize_epoch``, per step), split into the IB fit
  (``ferd.fae.ib_fit``, all ``fae.ib_steps`` steps), L_uni (``ferd.fae.uniformity_loss``, forward +
  backward) and the rest (generator forward/backward, teacher and student passes, L_bn/L_oh/L_adv);
- the per-epoch probe (``ferd.probe.probe_teacher``: PGD-``probe.steps`` on the kept batch);
- distill step (``ferd.distill.train_student``, per step), split into UTAE crafting
  (``ferd.utae.craft_utae`` against the student, ``utae.steps`` steps) and the rest (teacher
  forward, student forward/backward and SGD step, batch gather and augmentation);

and prints milliseconds per step, host syncs per step (CUDA: ``torch.cuda.set_sync_debug_mode``,
the extra syncs of a run with ``--steps`` steps over a 1-step run), peak memory, and the projected
hours: ``E · (N_G · synthesis step + probe) + (E − warm-up) · N_S · distill step`` (staged
schedule; excludes fetch-teacher, gen-utae, evaluation with AutoAttack, and the shadow student).
On CUDA every timer is bracketed by ``torch.cuda.synchronize()``. On a CPU the default batch is 8
and per-step costs are scaled linearly to the preset's batch (per-image cost is about constant on
a CPU; the output says so). The numbers are for this machine alone: time it when nothing else runs.
"""

from __future__ import annotations

import argparse
import math
import resource
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


@dataclass
class Measured:
    preset: str
    device: str
    batch: int  # the batch the steps ran with
    real_batch: int  # the preset's batch (per-step times are scaled to it)
    synth_ms: float
    ib_ms: float
    uni_ms: float
    probe_ms: float
    distill_ms: float
    utae_ms: float
    synth_syncs: float | None
    distill_syncs: float | None
    peak_mb: float
    epochs: int
    warmup: int
    n_g: int
    n_s: int

    @property
    def hours(self) -> float:
        per_synth_epoch = self.n_g * self.synth_ms + self.probe_ms
        return (self.epochs * per_synth_epoch + (self.epochs - self.warmup) * self.n_s * self.distill_ms) / 3.6e6


def _timer(device) -> Callable[[Callable[[], object]], float]:
    import torch

    def run(fn: Callable[[], object]) -> float:
        """Seconds of one call of ``fn``, device work included."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return run


def _syncs(fn: Callable[[], object]) -> int:
    """Host synchronisations of one call of ``fn`` on CUDA (sync debug mode's warnings)."""
    import torch

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message).lower() for w in caught)


def _per_step(time_it: Callable, run: Callable[[int], Callable[[], object]], steps: int) -> float:
    """Seconds per step: (T(steps) − T(1)) / (steps − 1), so per-epoch set-up (a fresh generator, the
    kept batch's check, the epoch-end snapshot) does not count as step time; T(1) for one step."""
    one = time_it(run(1))
    if steps == 1:
        return one
    return max(time_it(run(steps)) - one, 0.0) / (steps - 1)


def _peak_mb(device) -> float:
    import torch

    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def _params(preset: str, quick: bool):
    from ferd.config import params_from_mapping
    from ferd.presets import merged_params

    merged = merged_params(preset, base=REPO / "params.yaml", configs=REPO / "configs")
    params = params_from_mapping(merged)
    if quick:  # tiny shapes, same code paths
        small = {"teacher": {"arch": "cnn", "width": 4}, "distill": {"arch": "cnn", "width": 4},
                 "fae": {"ngf": 8, "nz": 16, "ib_steps": 2}, "utae": {"steps": 2}, "probe": {"steps": 2}}
        for section, values in small.items():
            merged[section] = {**merged.get(section, {}), **values}
        merged["runtime"] = {**merged.get("runtime", {}), "device": "cpu"}
        params = params_from_mapping(merged)
    return params


def measure(preset: str, device, batch: int, steps: int, precision: str, quick: bool) -> Measured:
    import torch

    from ferd.data import dataset_info
    from ferd.distill import Pool, train_student
    from ferd.fae import ib_fit, robust_mask, synthesize_epoch, uniformity_loss
    from ferd.models import build_model
    from ferd.probe import probe_teacher
    from ferd.runtime import autocast, device_generator
    from ferd.utae import craft_utae

    params = _params(preset, quick)
    info = dataset_info(params.data)
    c, h, _w = info.image_shape
    if quick:
        h = 16
    shape = (c, h, h)
    real_batch = params.fae.batch_size
    fae = replace(params.fae, batch_size=batch, steps=steps)
    dcfg = replace(params.distill, batch_size=batch, steps=steps)
    time_it = _timer(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    torch.manual_seed(0)
    teacher = build_model(params.teacher.arch, num_classes=info.num_classes, in_channels=c, image_size=h,
                          width=params.teacher.width).to(device).eval()
    student = build_model(params.distill.arch, num_classes=info.num_classes, in_channels=c, image_size=h,
                          width=params.distill.width).to(device)
    p = torch.full((info.num_classes,), 1.0 / info.num_classes)

    def synth(n_steps: int):
        return lambda: synthesize_epoch(teacher, student, p, replace(fae, steps=n_steps), image_shape=shape,
                                        generator=torch.Generator().manual_seed(0), device=device, precision=precision)

    synth(1)()  # warm-up: cuDNN algorithms, allocator, lazy init
    synth_s = _per_step(time_it, synth, steps)

    # the IB fit and L_uni at the same shapes
    x = torch.rand(batch, *shape, device=device)
    y = torch.randint(info.num_classes, (batch,), device=device)
    gen = device_generator(torch.Generator().manual_seed(1), device)
    with torch.no_grad(), autocast(device, precision):
        feats = teacher.forward_features(x)

    def ib():
        with autocast(device, precision):
            return ib_fit(teacher, feats, y, steps=params.fae.ib_steps, lr=params.fae.ib_lr, beta=params.fae.ib_beta,
                          generator=gen)

    sigma = ib()
    ib_s = time_it(ib)
    mask = robust_mask(sigma, feats, params.fae.ib_threshold)
    z = feats.detach().clone().requires_grad_(True)

    def uni():
        with autocast(device, precision):
            loss = uniformity_loss(teacher, z, mask)
        loss.backward()

    uni()
    uni_s = time_it(uni)

    # the per-epoch probe: PGD on the kept batch
    kept = torch.rand(batch, *shape)
    labels = torch.randint(info.num_classes, (batch,))
    eps = params.data.eps

    def probe():
        probe_teacher(teacher, kept, labels, info.num_classes, eps=eps, alpha=params.probe.step_size * eps,
                      steps=params.probe.steps, generator=torch.Generator().manual_seed(2))

    probe_s = time_it(probe)

    # distillation: a pool of two batches, one student epoch of `steps` steps
    pool = Pool(torch.rand(2 * batch, *shape), torch.randint(info.num_classes, (2 * batch,)),
                torch.ones(2 * batch, dtype=torch.long))

    def distill(n_steps: int):
        return lambda: train_student(student, teacher, pool, replace(dcfg, steps=n_steps), params.utae, total_epochs=2,
                                     warmup=1, eps=eps, seed=0, device=device, precision=precision)

    distill(1)()
    distill_s = _per_step(time_it, distill, steps)
    t = teacher(x).detach()
    ugen = device_generator(torch.Generator().manual_seed(3), device)

    def utae():
        with autocast(device, precision):
            craft_utae(student, x, t, eps=eps, alpha=params.utae.step_size * eps, steps=params.utae.steps,
                       gamma=params.utae.gamma, init_noise=params.utae.init_noise, generator=ugen)

    utae()
    utae_s = time_it(utae)

    synth_syncs = distill_syncs = None
    if device.type == "cuda" and steps >= 2:
        synth_syncs = (_syncs(synth(steps)) - _syncs(synth(1))) / (steps - 1)
        distill_syncs = (_syncs(distill(steps)) - _syncs(distill(1))) / (steps - 1)

    scale = real_batch / batch  # CPU: linear in the batch; CUDA runs at the real batch (scale 1)
    ms = 1000.0 * scale
    return Measured(
        preset=preset, device=str(device), batch=batch, real_batch=real_batch,
        synth_ms=synth_s * ms, ib_ms=ib_s * ms, uni_ms=uni_s * ms, probe_ms=probe_s * ms,
        distill_ms=distill_s * ms, utae_ms=utae_s * ms, synth_syncs=synth_syncs, distill_syncs=distill_syncs,
        peak_mb=_peak_mb(device), epochs=params.fae.epochs, warmup=params.fae.warmup, n_g=params.fae.steps,
        n_s=params.distill.steps,
    )


def report(m: Measured, precision: str, quick: bool) -> None:
    scaled = f", measured at batch {m.batch} and scaled linearly to {m.real_batch}" if m.batch != m.real_batch else ""
    tiny = "; --quick: tiny networks and shapes, the figures say nothing about the preset" if quick else ""
    print(f"\n{m.preset} on {m.device} ({precision}{scaled}{tiny})")
    rows = [
        ("synthesis step", m.synth_ms, "per generator step (N_G per epoch)"),
        ("  IB fit", m.ib_ms, "ferd.fae.ib_fit, all IB steps"),
        ("  L_uni", m.uni_ms, "ferd.fae.uniformity_loss, forward + backward"),
        ("  generator + teacher + rest", m.synth_ms - m.ib_ms - m.uni_ms, "generator fwd/bwd, teacher, L_bn/L_oh/L_adv"),
        ("probe PGD", m.probe_ms, "per epoch (ferd.probe.probe_teacher on the kept batch)"),
        ("distill step", m.distill_ms, "per student step (N_S per epoch)"),
        ("  UTAE crafting", m.utae_ms, "ferd.utae.craft_utae against the student"),
        ("  student step + rest", m.distill_ms - m.utae_ms, "teacher fwd, student fwd/bwd + SGD, gather, augment"),
    ]
    for name, value, what in rows:
        print(f"  {name:<30}{value:>11.1f} ms   {what}")
    if m.synth_syncs is not None:
        print(f"  host syncs per step: synthesis {m.synth_syncs:g}, distill {m.distill_syncs:g}")
    else:
        print("  host syncs per step: not counted (CUDA only, with --steps >= 2)")
    print(f"  peak memory: {m.peak_mb:.0f} MiB ({'GPU, allocated' if m.device.startswith('cuda') else 'process RSS'})")
    print(f"  projected: {m.epochs} epochs x ({m.n_g} x synthesis + probe) + {m.epochs - m.warmup} x {m.n_s} x distill "
          f"= {_hours(m.hours)} h")


def _hours(h: float) -> str:
    """Hours, readable from minutes (fmnist-paper) to months (a paper preset on a CPU)."""
    if not math.isfinite(h) or h >= 100:
        return f"{h:.0f}"
    return f"{h:.1f}" if h >= 1 else f"{h:.3g}"


def main(argv: list[str] | None = None) -> None:
    import torch

    from ferd.presets import list_presets
    from ferd.runtime import check_precision, resolve_device

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", action="append", help="a preset of configs/ (repeatable; default: all of them)")
    ap.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N")
    ap.add_argument("--batch", type=int, default=None, help="batch to run (default: the preset's on CUDA, 8 on a CPU)")
    ap.add_argument("--steps", type=int, default=None, help="synthesis and distill steps timed (default 3, CPU 2)")
    ap.add_argument("--precision", default="fp32", choices=("fp32", "bf16"), help="runtime.precision (bf16: CUDA only)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--quick", action="store_true", help="tiny shapes on the CPU: a smoke test of this script")
    args = ap.parse_args(argv)

    presets = args.preset or list_presets(REPO / "configs")
    device = torch.device("cpu") if args.quick else resolve_device(args.device)
    check_precision(args.precision, device)
    if args.threads:
        torch.set_num_threads(args.threads)
    on_cpu = device.type != "cuda"
    steps = args.steps or (2 if on_cpu or args.quick else 3)
    print(f"bench_paper: device {device}, precision {args.precision}, {steps} timed steps per part"
          + (f", torch threads {torch.get_num_threads()}" if on_cpu else f", {torch.cuda.get_device_name(device)}"))
    results = []
    for preset in presets:
        batch = args.batch or (8 if on_cpu else _params(preset, args.quick).fae.batch_size)
        m = measure(preset, device, batch, steps, args.precision, args.quick)
        report(m, args.precision, args.quick)
        results.append(m)
    print("\nprojected hours per preset (staged schedule; fetch-teacher, gen-utae and evaluation not included"
          + ("; --quick: meaningless" if args.quick else "") + "):")
    for m in results:
        how = "" if m.batch == m.real_batch else f"  (batch {m.batch} scaled to {m.real_batch})"
        print(f"  {m.preset:<32}{_hours(m.hours):>10} h on {m.device}{how}")
    if any(not math.isfinite(m.hours) for m in results):
        raise SystemExit("bench_paper: a measurement was not finite")


if __name__ == "__main__":
    main()
