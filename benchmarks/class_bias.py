"""Is the student's coat / shirt deficit a class-prior shift a per-class logit bias could undo?

On real test images the default student predicts pullover about twice as often as the teacher and
coat half as often (docs/results.md, "Coat and shirt transfer"). If that were a shift of the
student's class prior, a bias vector b added to its logits would undo it, and b could be fitted
without data on synthetic images. This script measures both halves of that hypothesis:

1. **Where the shift shows.** Teacher and student argmax counts per class on the real test split,
   on real training images, and on synthetic sets built from the pool: the pool itself, mixup of
   random pool pairs, the distillation's boundary examples (``hee+disagree``) crafted against the
   final student, longer student HEEs, teacher HEEs, uniform noise.
2. **What a bias buys.** For each set, b = argmin_b mean KL(softmax(T(x)) ‖ softmax(S(x) + b)) (convex
   in b; at the optimum the biased student's mean predicted distribution equals the teacher's), and
   the biased student's clean / PGD-20 accuracy per class on the test split and its transfer
   (student clean / teacher clean). The bias fitted on **real** training images is the oracle: not
   data-free, it bounds what any data-free estimate of b can do.

Attacks run on the biased model in eval mode, inputs in [0, 1]; the test split only reports, it
never fits anything.

    python benchmarks/class_bias.py [--student data/student/student.safetensors] [--threads 2]
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ferd.adversaries import craft_boundary
from ferd.artifacts import load_h5, load_model
from ferd.attacks import run_attack
from ferd.config import load_params
from ferd.data import class_balanced_subset, load_split
from ferd.metrics import per_class_accuracy


class Biased(nn.Module):
    """``model(x) + bias``: the student with a per-class logit bias."""

    def __init__(self, model: nn.Module, bias: Tensor) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("bias", bias.detach().clone())

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x) + self.bias


@torch.no_grad()
def batched_logits(model: nn.Module, x: Tensor, batch_size: int = 1000) -> Tensor:
    return torch.cat([model(x[i:i + batch_size]) for i in range(0, len(x), batch_size)])


def fit_bias(student_logits: Tensor, teacher_logits: Tensor) -> Tensor:
    """argmin_b mean KL(softmax(t) ‖ softmax(s + b)), centred to sum 0 (softmax ignores a common shift).

    The objective is convex in b and its gradient is mean(softmax(s + b)) − mean(softmax(t)): the fitted
    bias makes the student's mean predicted distribution the teacher's.
    """
    target = F.softmax(teacher_logits.double(), dim=1)
    s = student_logits.double()
    b = torch.zeros(s.shape[1], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([b], max_iter=200, tolerance_grad=1e-10, line_search_fn="strong_wolfe")

    def closure() -> Tensor:
        opt.zero_grad()
        loss = F.kl_div(F.log_softmax(s + b, dim=1), target, reduction="batchmean")
        loss.backward()
        return loss

    opt.step(closure)
    return (b - b.mean()).detach().float()


def argmax_counts(logits: Tensor, num_classes: int) -> list[int]:
    return torch.bincount(logits.argmax(1), minlength=num_classes).tolist()


def evaluate_biased(model: nn.Module, x: Tensor, y: Tensor, *, eps: float, num_classes: int,
                    batch_size: int = 500) -> tuple[Tensor, Tensor]:
    """Per-class clean and PGD-20 (step 0.25 ε, one random start, seed 0) accuracy of ``model``."""
    clean = run_attack(model, x, y, name="clean", eps=eps, batch_size=batch_size)
    robust = run_attack(model, x, y, name="pgd", eps=eps, alpha=0.25 * eps, steps=20, batch_size=batch_size,
                        generator=torch.Generator().manual_seed(0))
    return per_class_accuracy(clean, y, num_classes), per_class_accuracy(robust, y, num_classes)


def synthetic_sets(pool_x: Tensor, student: nn.Module, teacher: nn.Module, eps: float,
                   seed: int = 1) -> dict[str, Tensor]:
    """The synthetic image sets a data-free bias could be fitted on (all from the pool, no real image)."""
    gen = torch.Generator().manual_seed(seed)
    n = len(pool_x)
    partner = torch.randint(0, n, (n,), generator=gen)
    lam = torch.rand(n, 1, 1, 1, generator=gen)

    def crafted(kind: str, steps: int, step_size: float) -> Tensor:
        return torch.cat([craft_boundary(kind, student, teacher, pool_x[i:i + 256], steps=steps, step_size=step_size)
                          for i in range(0, n, 256)])

    return {
        "pool": pool_x,
        "mixup of pool pairs": lam * pool_x + (1 - lam) * pool_x[partner],
        "boundary examples (hee+disagree, 3 x 0.3 eps)": crafted("hee+disagree", 3, 0.3 * eps),
        "student HEEs (10 x 0.03)": crafted("hee", 10, 0.03),
        "teacher HEEs (3 x 0.03)": crafted("hee_teacher", 3, 0.03),
        "uniform noise": torch.rand(2000, *pool_x.shape[1:], generator=gen),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--teacher", default="data/teacher/teacher.safetensors")
    parser.add_argument("--student", default="data/student/student.safetensors")
    parser.add_argument("--pool", default="data/fae/pool.h5")
    parser.add_argument("--real-per-class", type=int, default=200, help="real training images per class (oracle)")
    parser.add_argument("--test-per-class", type=int, default=0, help="test images per class (0 = all)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    params = load_params(args.params)
    eps = params.data.eps
    teacher, _ = load_model(args.teacher)
    student, _ = load_model(args.student, produced_by="distill")
    pool_x = torch.as_tensor(load_h5(args.pool, kind="pool", required=("x",))[0]["x"]).float()
    test = load_split(params.data, "test")
    if args.test_per_class:
        test = class_balanced_subset(test, args.test_per_class, 0)
    tx, ty = test.images(), test.y
    real = class_balanced_subset(load_split(params.data, "train"), args.real_per_class, 0).images()
    k = test.num_classes
    names = test.class_names

    sets = {"real test split (reports only)": tx, f"real training images ({args.real_per_class} / class)": real}
    sets.update(synthetic_sets(pool_x, student, teacher, eps))
    print("argmax counts per class (" + ", ".join(names) + ")")
    logits: dict[str, tuple[Tensor, Tensor]] = {}
    for what, x in sets.items():
        t, s = batched_logits(teacher, x), batched_logits(student, x)
        logits[what] = (s, t)
        agree = float((t.argmax(1) == s.argmax(1)).float().mean())
        print(f"  {what}: {len(x)} images, agreement {agree:.3f}\n    teacher {argmax_counts(t, k)}\n"
              f"    student {argmax_counts(s, k)}")

    teacher_clean = per_class_accuracy(batched_logits(teacher, tx).argmax(1), ty, k)
    fits: list[tuple[str, Callable[[], Tensor]]] = [("none (the student as trained)", lambda: torch.zeros(k))]
    fits += [(f"fitted on {what}", lambda w=what: fit_bias(*logits[w])) for what in sets if not what.startswith("real test")]
    print(f"\nbiased student on {len(tx)} test images (transfer = student clean / teacher clean)")
    for label, fit in fits:
        start = time.time()
        bias = fit()
        clean, robust = evaluate_biased(Biased(student, bias), tx, ty, eps=eps, num_classes=k)
        transfer = clean / teacher_clean
        lowest = int(transfer.argmin())
        print(f"  bias {label}: clean {float(clean.mean()):.4f}  PGD-20 {float(robust.mean()):.4f}  "
              f"worst PGD-20 {float(robust.min()):.3f} ({names[int(robust.argmin())]})  lowest transfer "
              f"{float(transfer[lowest]):.2f} ({names[lowest]})\n    transfer "
              + " ".join(f"{names[c]} {float(transfer[c]):.2f}" for c in range(k))
              + f"\n    b = [{', '.join(f'{v:+.2f}' for v in bias.tolist())}]  [{time.time() - start:.0f} s]", flush=True)


if __name__ == "__main__":
    main()
