"""Helpers that write tiny on-disk dataset fixtures in the real layouts (for tests only).

The CIFAR writers use ``pickle`` because the official CIFAR format is pickles; only tests write them.
Keys are ``str`` (``"data"``, ``"labels"``, ...), which is how torchvision sees the official
Python-2 pickles (it loads them with ``encoding="latin1"``; with ``encoding="bytes"`` they read
as ``b"data"``, ``b"labels"``).
"""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np

CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()


def write_fashion_mnist_idx(
    dir: Path, n_train: int = 40, n_test: int = 20, seed: int = 0, *, compress: bool = True
) -> Path:
    """The four Fashion-MNIST IDX files (gzipped unless ``compress`` is false) in ``dir``.

    Random 28x28 images; labels cycle 0..9. Returns ``dir``.
    """
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, size=(n, 28, 28), dtype=np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        for kind, arr, magic in (("images-idx3", images, 2051), ("labels-idx1", labels, 2049)):
            data = _idx_bytes(arr, magic)
            name = f"{prefix}-{kind}-ubyte"
            if compress:
                (dir / f"{name}.gz").write_bytes(gzip.compress(data, mtime=0))
            else:
                (dir / name).write_bytes(data)
    return dir


def _dump(path: Path, obj: object) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _cifar_rows(rng: np.random.Generator, n: int) -> np.ndarray:
    # [N, 3072]: the R plane (32x32, row-major), then G, then B
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def write_cifar10_batches(root: Path, n_per_batch: int = 10, seed: int = 0) -> Path:
    """``<root>/cifar-10-batches-py/`` with data_batch_1..5, test_batch and batches.meta; returns it."""
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for i, name in enumerate([f"data_batch_{b}" for b in range(1, 6)] + ["test_batch"]):
        labels = [int(v) for v in (np.arange(n_per_batch) + i) % 10]
        _dump(
            folder / name,
            {
                "batch_label": f"fixture batch {i + 1}",
                "labels": labels,
                "data": _cifar_rows(rng, n_per_batch),
                "filenames": [f"img_{i}_{j}.png" for j in range(n_per_batch)],
            },
        )
    _dump(folder / "batches.meta", {"num_cases_per_batch": n_per_batch, "label_names": CIFAR10_NAMES, "num_vis": 3072})
    return folder


def write_cifar100_python(root: Path, n_train: int = 20, n_test: int = 10, seed: int = 0) -> Path:
    """``<root>/cifar-100-python/`` with train, test and meta (fine and coarse labels); returns it."""
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    for name, n in (("train", n_train), ("test", n_test)):
        fine = [int(v) for v in np.arange(n) % 100]
        _dump(
            folder / name,
            {
                "filenames": [f"{name}_{j}.png" for j in range(n)],
                "batch_label": f"{name} fixture",
                "fine_labels": fine,
                "coarse_labels": [f // 5 for f in fine],
                "data": _cifar_rows(rng, n),
            },
        )
    fine_names = [f"fine{i:02d}" for i in range(100)]
    coarse_names = [f"coarse{i:02d}" for i in range(20)]
    _dump(folder / "meta", {"fine_label_names": fine_names, "coarse_label_names": coarse_names})
    return folder


def write_tiny_imagenet(
    root: Path, n_classes: int = 3, n_train: int = 2, n_val: int = 2, size: int = 64, seed: int = 0
) -> Path:
    """``<root>/tiny-imagenet-200/`` in the standard layout with random JPEGs; returns it.

    ``n_train`` / ``n_val`` images per class. wnids.txt lists the classes unsorted; words.txt names
    every class but the last (which must fall back to its wnid) and has one unrelated extra entry.
    """
    from PIL import Image

    base = Path(root) / "tiny-imagenet-200"
    rng = np.random.default_rng(seed)
    wnids = [f"n{9000000 - 1000 * i:08d}" for i in range(n_classes)]  # descending: order must be sorted
    base.mkdir(parents=True, exist_ok=True)
    (base / "wnids.txt").write_text("".join(f"{w}\n" for w in wnids))
    words = [f"{w}\tthing{w[-4:]}, alias of {w}" for w in wnids[:-1]] + ["n00000001\tentity"]
    (base / "words.txt").write_text("\n".join(words) + "\n")

    def save(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(path, "JPEG")

    for w in wnids:
        for j in range(n_train):
            save(base / "train" / w / "images" / f"{w}_{j}.JPEG")
        (base / "train" / w / f"{w}_boxes.txt").write_text("")
    lines = []
    for j in range(n_val * n_classes):
        w = wnids[j % n_classes]
        save(base / "val" / "images" / f"val_{j}.JPEG")
        lines.append(f"val_{j}.JPEG\t{w}\t0\t0\t{size - 1}\t{size - 1}")
    (base / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return base
