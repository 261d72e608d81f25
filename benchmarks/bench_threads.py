"""Forward+backward time of the default networks at batch 128 (1x28x28), 1 vs 2 torch threads.

    python benchmarks/bench_threads.py
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from ferd.models import build_generator, build_model


def step_time(net, x, y, reps=10):
    for _ in range(2):
        F.cross_entropy(net(x), y).backward()
    start = time.perf_counter()
    for _ in range(reps):
        F.cross_entropy(net(x), y).backward()
    return (time.perf_counter() - start) / reps


def main() -> None:
    x, y = torch.rand(128, 1, 28, 28), torch.randint(0, 10, (128,))
    nets = {f"cnn w{w}": build_model("cnn", num_classes=10, in_channels=1, image_size=28, width=w) for w in (16, 8)}
    rows = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for name, net in nets.items():
            rows.append((name, threads, step_time(net, x, y)))
        for ngf in (64, 32, 16):
            gen = build_generator(nz=100, ngf=ngf, image_size=28, channels=1)
            z = torch.randn(128, 100)
            for _ in range(2):
                gen(z).mean().backward()
            start = time.perf_counter()
            for _ in range(5):
                gen(z).mean().backward()
            rows.append((f"generator ngf {ngf}", threads, (time.perf_counter() - start) / 5))
    print(f"{'network':<20}{'threads':>8}{'ms/step':>10}")
    for name, threads, t in rows:
        print(f"{name:<20}{threads:>8}{1000 * t:>10.1f}")


if __name__ == "__main__":
    main()
