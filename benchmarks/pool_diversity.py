"""Per-class diversity of synthetic pools, next to the same measure on real training images.

For each pool (a `ferd synth-fae` output, `data/fae/pool.h5`) and for `--real-per-class` real
training images per class (the dataset of params.yaml's `data` section, a class-balanced draw),
prints the mean pairwise L2 distance between the images of each class (pixels in [0, 1]) and its
mean over classes. A pool whose classes collapse onto a few modes (e.g. `fae.conditional=true`,
docs/results.md "Coat and shirt transfer") shows distances well below the real images'; pixel
distance also counts noise, so a high value is not by itself evidence of useful diversity.

    python benchmarks/pool_diversity.py data/fae/pool.h5 [other/pool.h5 ...] [--real-per-class 128]
"""

from __future__ import annotations

import argparse

import torch

from ferd.artifacts import load_h5
from ferd.config import load_params
from ferd.data import class_balanced_subset, load_split


def class_distances(x: torch.Tensor, y: torch.Tensor, num_classes: int) -> list[float]:
    """Mean pairwise L2 distance between the flattened images of each class (nan for < 2 images)."""
    flat = x.flatten(1).float()
    out = []
    for c in range(num_classes):
        xc = flat[y == c]  # images in [0, 1]
        n = len(xc)
        out.append(float(torch.cdist(xc, xc).sum() / (n * (n - 1))) if n > 1 else float("nan"))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pools", nargs="+", help="pool.h5 files written by `ferd synth-fae`")
    parser.add_argument("--params", default="params.yaml", help="for the real images' dataset")
    parser.add_argument("--real-per-class", type=int, default=128, help="real training images per class (0 = skip)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    rows: list[tuple[str, int, list[float], list[str]]] = []
    for path in args.pools:
        arrays, attrs = load_h5(path, kind="pool", required=("x", "y"))
        x, y = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"]).long()
        names = [str(n) for n in attrs.get("class_names", [])] or [str(c) for c in range(int(y.max()) + 1)]
        rows.append((path, len(y), class_distances(x, y, len(names)), names))
    if args.real_per_class > 0:
        real = class_balanced_subset(load_split(load_params(args.params).data, "train"), args.real_per_class, seed=0)
        rows.append((f"real train ({args.real_per_class}/class)", len(real.y),
                     class_distances(real.x.float() / 255.0, real.y, real.num_classes), list(real.class_names)))

    names = rows[0][3]
    print("mean pairwise L2 distance within each class")
    print(f"{'':34s} {'n':>5s} " + " ".join(f"{n[:7]:>7s}" for n in names) + "    mean")
    for label, n, dist, _ in rows:
        print(f"{label[-34:]:34s} {n:5d} " + " ".join(f"{d:7.2f}" for d in dist) + f" {sum(dist) / len(dist):7.2f}")


if __name__ == "__main__":
    main()
