"""Evaluation throughput per attack (images/s) and the projected time of the default `evaluate` stage.

    python benchmarks/bench_evaluate.py [--model data/teacher/teacher.safetensors] [--images 512]

Uses the trained teacher when it exists, else a randomly initialised model of the default
architecture (attack cost does not depend on the weights, except AutoAttack, whose cost grows with
the number of points that stay robust: it is timed on the trained model only). Prints, per attack,
images/s and the ratio to clean inference, then the projected time of `ferd evaluate` with the
repository's params.yaml.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from ferd.artifacts import load_model
from ferd.attacks import autoattack_predictions, run_attack
from ferd.config import load_params
from ferd.data import class_balanced_indices, dataset_info, load_split
from ferd.models import build_model


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=Path("data/teacher/teacher.safetensors"))
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--aa-per-class", type=int, default=2)
    args = ap.parse_args()

    params = load_params(args.params)
    cfg, eps = params.evaluate, params.data.eps
    if params.runtime.threads:
        torch.set_num_threads(params.runtime.threads)
    trained = args.model.is_file()
    if trained:
        model, _ = load_model(args.model)
    else:
        info = dataset_info(params.data)
        model = build_model(params.teacher.arch, num_classes=info.num_classes, in_channels=info.image_shape[0],
                            image_size=info.image_shape[1], width=params.teacher.width).eval()
    test = load_split(params.data, "test")
    x, y = test.images()[: args.images], test.y[: args.images]
    print(f"model: {args.model if trained else 'random ' + params.teacher.arch}; {len(y)} images; "
          f"threads {torch.get_num_threads()}")
    rates = {}
    plan = {
        "clean": {}, "fgsm": {},
        "pgd": {"alpha": cfg.pgd_step_size * eps, "steps": cfg.pgd_steps},
        "cw": {"alpha": cfg.cw_step_size * eps, "steps": cfg.cw_steps},
    }
    for name, kw in plan.items():
        start = time.perf_counter()
        run_attack(model, x, y, name=name, eps=eps, batch_size=cfg.batch_size, generator=torch.Generator().manual_seed(0), **kw)
        rates[name] = len(y) / (time.perf_counter() - start)
    n_test = len(test) if not cfg.per_class else cfg.per_class * test.num_classes
    projected = sum(n_test / r for r in rates.values())
    sweep = len(cfg.eps_sweep) * cfg.autoattack_per_class * test.num_classes / rates["pgd"]
    print(f"{'attack':<12}{'images/s':>10}{'x clean':>10}")
    for name, r in rates.items():
        print(f"{name:<12}{r:>10.1f}{rates['clean'] / r:>10.1f}")
    if trained and cfg.autoattack != "off":
        idx = class_balanced_indices(test.y, test.num_classes, args.aa_per_class, 0)
        start = time.perf_counter()
        autoattack_predictions(model, test.images(idx), test.y[idx], eps=eps, version=cfg.autoattack,
                               batch_size=cfg.batch_size, seed=0, device="cpu")
        aa_rate = len(idx) / (time.perf_counter() - start)
        print(f"{'AA ' + cfg.autoattack:<12}{aa_rate:>10.2f}{rates['clean'] / aa_rate:>10.1f}")
        projected += cfg.autoattack_per_class * test.num_classes / aa_rate
    projected += sweep
    print(f"projected `ferd evaluate` ({n_test} test images, AutoAttack on "
          f"{cfg.autoattack_per_class * test.num_classes}, sweep x{len(cfg.eps_sweep)}): {projected:.0f} s")


if __name__ == "__main__":
    main()
