"""How each IB threshold rule splits a teacher's features into robust / non-robust channels.

Synthesises one class-faithful batch from the teacher (lambda_oh 5, no uniformity term), fits the
information bottleneck (method reference eq. 3) for 10, 50 and 200 steps, with and without the
matched initialisation, and prints for each rule (`global`, `per-sample`, `ratio`):
- the robust fraction of (sample, channel) pairs,
- the teacher head's accuracy on the robust-only and non-robust-only features (a useful split
  keeps the label in the robust part and little of it in the non-robust part),
- how well the 10- and 50-step ratio masks agree with the converged (200-step) one.

    python benchmarks/ib_split.py data/teacher/teacher.safetensors [--batch 64] [--steps 20]

It is the evidence for `fae.ib_threshold: ratio` (docs/method.md).
"""

from __future__ import annotations

import argparse

import torch

from ferd.artifacts import load_model
from ferd.config import FaeConfig
from ferd.fae import channel_variance, ib_fit, robust_mask, synthesize_epoch

RULES = ("global", "per-sample", "ratio")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("teacher", help="a ferd model artifact (safetensors)")
    parser.add_argument("--batch", type=int, default=64, help="synthetic images")
    parser.add_argument("--steps", type=int, default=20, help="generator steps for the batch")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    teacher, meta = load_model(args.teacher)
    shape = tuple(meta["input_shape"])
    classes = int(meta["num_classes"])
    cfg = FaeConfig(epochs=2, warmup=1, batch_size=args.batch, steps=args.steps, ngf=32, lambda_uni=0.0, lambda_oh=5.0)
    out = synthesize_epoch(teacher, None, torch.full((classes,), 1.0 / classes), cfg, image_shape=shape,
                           generator=torch.Generator().manual_seed(0), device="cpu")
    x, y = out.x, out.y
    print(f"{len(y)} synthetic images, teacher agreement {out.log['teacher_acc']:.3f}")
    feats = teacher.forward_features(x).detach()
    v = channel_variance(feats)
    print(f"channel variance v over the batch: min {v.min():.3g} median {v.median():.3g} max {v.max():.3g}")

    def fit(steps: int, matched: bool, seed: int) -> torch.Tensor:
        return ib_fit(teacher, feats, y, steps=steps, lr=0.1, beta=0.3,
                      generator=torch.Generator().manual_seed(seed), matched_init=matched)

    print("| IB steps | matched init | rule | robust fraction | head acc robust-only | head acc non-robust-only |")
    print("|---|---|---|---|---|---|")
    for steps in (10, 50, 200):
        for matched in (False, True):
            sigma = fit(steps, matched, seed=1)
            for rule in RULES:
                mask = robust_mask(sigma, feats, rule)
                with torch.no_grad():
                    acc_r = (teacher.forward_head(feats * mask).argmax(1) == y).float().mean()
                    acc_n = (teacher.forward_head(feats * (1 - mask)).argmax(1) == y).float().mean()
                print(f"| {steps} | {matched} | {rule} | {mask.float().mean():.3f} | {acc_r:.2f} | {acc_n:.2f} |")
    reference = robust_mask(fit(200, True, seed=1), feats, "ratio")
    for steps, matched in ((10, False), (10, True), (50, True)):
        mask = robust_mask(fit(steps, matched, seed=2), feats, "ratio")
        agree = (mask == reference).float().mean()
        print(f"ratio mask after {steps} steps (matched init {matched}) agrees with the 200-step mask on "
              f"{agree:.3f} of (sample, channel) pairs")


if __name__ == "__main__":
    main()
