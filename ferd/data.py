"""Datasets: fetched into the pipeline as a DVC output, then read as in-memory uint8 tensors.

``ferd fetch-data`` (:func:`fetch_dataset`, the pipeline's first stage) copies, verifies or
downloads the dataset named by ``data.name`` into ``<data.root>/<data.name>`` (``data/raw/<name>``),
one DVC output that every stage reading the dataset depends on. Being a stage output, DVC caches
it, restores it into the temporary copies of queued experiments (``dvc exp run --queue``) and
pushes it to a remote (DESIGN.md "Scaling out"). The loaders below read that folder first; the
other places they know (older layouts directly under ``<root>``, Debian's Fashion-MNIST) serve a
stage run by hand before ``fetch-data``.

Every split is returned as an :class:`ImageSet` (``x`` uint8 ``[N, C, H, W]``, ``y`` int64 ``[N]``);
models see float32 images in ``[0, 1]`` (:meth:`ImageSet.images`, :meth:`ImageSet.batches`), any
normalisation lives inside the model. ``cfg`` below is a :class:`ferd.config.DataConfig`.

``fashion-mnist``
    Zalando's Fashion-MNIST: 60000 train / 10000 test grey 28x28 images, 10 classes. The IDX files
    (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
    ``t10k-labels-idx1-ubyte``, gzipped or not) are parsed here with numpy. Looked for, in order,
    in ``<root>/fashion-mnist/`` (fetch-data's output), ``<root>/FashionMNIST/raw/`` (torchvision's
    layout) and Debian's ``/usr/share/datasets/fashion-mnist/`` (package ``dataset-fashion-mnist``).
    fetch-data writes the four files decompressed and checks their content md5s
    (:data:`FASHION_MNIST_IDX_MD5`), so Zalando's .gz files, Debian's recompressed ones and a
    torchvision download all give the same output bytes.
``cifar10`` / ``cifar100``
    CIFAR-10 / CIFAR-100 (fine labels): 50000 train / 10000 test RGB 32x32 images, read by
    torchvision from ``cifar-10-batches-py/`` / ``cifar-100-python/`` in ``<root>/<name>/``
    (fetch-data's output) or directly in ``<root>/`` (the official python pickles; torchvision's
    unpickling is the one place the project reads pickles). fetch-data checks every file against
    torchvision's published md5s; both md5 checks can be switched off
    (``data.verify_checksums: false``) so tiny test fixtures load.
``tiny-imagenet``
    Tiny-ImageNet-200: 100000 train / 10000 val RGB 64x64 JPEGs, 200 classes, in the standard
    ``tiny-imagenet-200/`` layout (``wnids.txt``, ``words.txt``, ``train/<wnid>/images/``,
    ``val/images/`` + ``val/val_annotations.txt``) in ``<root>/<name>/`` or ``<root>/``. The
    ``test`` split is the labelled val folder. Classes are ordered by sorted wnid. fetch-data checks
    the zip's md5 (:data:`TINY_IMAGENET_ZIP_MD5`) when it has the zip, the file counts otherwise,
    and leaves out the unlabelled ``test/`` folder.
``synthetic``
    A generated, deterministic dataset for tests and quick checks (``data.synthetic``): each class
    is a fixed random block pattern, every image adds Gaussian noise, a brightness jitter and a shift
    of at most one pixel. Train and test use different noise seeds. Nothing is read from disk;
    fetch-data writes only its manifest (holding ``data.synthetic``), so the pipeline's graph is the
    same for every dataset.

Failures a user can fix (missing, truncated or corrupt files) raise :class:`ferd.errors.DataError`
with a message saying where we looked and what to do.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import math
import os
import shutil
import tempfile
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ferd.config import DataConfig, SyntheticDataConfig
from ferd.errors import DataError
from ferd.runtime import Progress, no_progress

Split = Literal["train", "test"]

FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
CIFAR100_CLASSES = tuple(
    """
    apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly
    camel can castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup
    dinosaur dolphin elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower
    leopard lion lizard lobster man maple_tree motorcycle mountain mouse mushroom oak_tree orange
    orchid otter palm_tree pear pickup_truck pine_tree plain plate poppy porcupine possum rabbit
    raccoon ray road rocket rose sea seal shark shrew skunk skyscraper snail snake spider squirrel
    streetcar sunflower sweet_pepper table tank telephone television tiger tractor train trout tulip
    turtle wardrobe whale willow_tree wolf woman worm
    """.split()
)
assert len(CIFAR100_CLASSES) == 100

#: Where a system-wide Fashion-MNIST is looked for after ``<root>`` (tests may patch this).
SYSTEM_FASHION_MNIST_DIRS: tuple[Path, ...] = (Path("/usr/share/datasets/fashion-mnist"),)
_FASHION_SUBDIRS = ("fashion-mnist", "FashionMNIST/raw")
_FASHION_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_IMAGES_MAGIC = 2051
_IDX_LABELS_MAGIC = 2049

TINY_IMAGENET_DIR = "tiny-imagenet-200"
TINY_IMAGENET_URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
#: md5 of tiny-imagenet-200.zip as cs231n.stanford.edu serves it (the value every loader checks).
TINY_IMAGENET_ZIP_MD5 = "90528d7ca1a48142e341f4ef8d21d0de"
#: Tiny-ImageNet-200's size, checked when fetch-data copies an extracted folder (no per-file md5s exist).
TINY_IMAGENET_COUNTS = {"classes": 200, "train_per_class": 500, "val": 10000}

#: md5 of the four Fashion-MNIST IDX files *after decompression*. Zalando's published .gz files
#: (torchvision's ``FashionMNIST.resources`` md5s, checked by torchvision when it downloads) and
#: Debian's recompressed copies (other .gz bytes) decompress to these, so fetch-data checks the
#: content whatever the gzip wrapping.
FASHION_MNIST_IDX_MD5 = {
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}

#: The file fetch-data writes into the dataset folder next to the data: what the folder holds.
FETCH_MANIFEST = "fetched.json"

_EPS_SMALL = 0.1
_EPS_RGB = 8 / 255


# --------------------------------------------------------------------------------------------
# containers


@dataclass(frozen=True)
class DatasetInfo:
    """What is known about a dataset without loading it."""

    name: str
    num_classes: int
    image_shape: tuple[int, int, int]  # (C, H, W)
    class_names: tuple[str, ...]
    default_eps: float  # the usual L-inf budget: 0.1 Fashion-MNIST/synthetic, 8/255 the RGB sets
    mean: tuple[float, ...]  # usual per-channel statistics of the train split, images in [0, 1]
    std: tuple[float, ...]


Index = torch.Tensor | slice | Sequence[int]


def _as_index(idx: Index) -> torch.Tensor | slice:
    if isinstance(idx, slice):
        return idx
    if isinstance(idx, torch.Tensor):
        return idx
    return torch.as_tensor(list(idx), dtype=torch.long)


@dataclass(frozen=True, eq=False)
class ImageSet:
    """A labelled split held in memory: ``x`` uint8 ``[N, C, H, W]``, ``y`` int64 ``[N]``."""

    x: torch.Tensor
    y: torch.Tensor
    class_names: tuple[str, ...]

    def __post_init__(self) -> None:
        if not isinstance(self.x, torch.Tensor) or self.x.dtype != torch.uint8 or self.x.dim() != 4:
            got = f"{self.x.dtype} {tuple(self.x.shape)}" if isinstance(self.x, torch.Tensor) else type(self.x)
            raise ValueError(f"ImageSet.x: expected a uint8 tensor [N, C, H, W], got {got}")
        if not isinstance(self.y, torch.Tensor) or self.y.dtype != torch.int64 or self.y.dim() != 1:
            got = f"{self.y.dtype} {tuple(self.y.shape)}" if isinstance(self.y, torch.Tensor) else type(self.y)
            raise ValueError(f"ImageSet.y: expected an int64 tensor [N], got {got}")
        if self.x.shape[0] != self.y.shape[0]:
            raise ValueError(f"ImageSet: {self.x.shape[0]} images but {self.y.shape[0]} labels")
        if not isinstance(self.class_names, tuple) or not self.class_names:
            raise ValueError("ImageSet.class_names: expected a non-empty tuple of names")
        if self.y.numel() and (int(self.y.min()) < 0 or int(self.y.max()) >= len(self.class_names)):
            raise ValueError(
                f"ImageSet.y: labels must lie in [0, {len(self.class_names)}), "
                f"got [{int(self.y.min())}, {int(self.y.max())}]"
            )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        c, h, w = self.x.shape[1:]
        return (int(c), int(h), int(w))

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def images(self, idx: Index | None = None) -> torch.Tensor:
        """float32 images in ``[0, 1]``: all of them, or those at ``idx`` (index tensor, list or slice)."""
        x = self.x if idx is None else self.x[_as_index(idx)]
        return x.to(torch.float32).div_(255.0)

    def subset(self, idx: Index) -> ImageSet:
        """The images and labels at ``idx``, in that order."""
        i = _as_index(idx)
        return ImageSet(self.x[i], self.y[i], self.class_names)

    def batches(
        self, batch_size: int, *, shuffle: bool = False, generator: torch.Generator | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(images float32 [B, C, H, W] in [0, 1], labels int64 [B])``, every index exactly once.

        ``shuffle`` draws one permutation from ``generator`` (torch's global one when None).
        """
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        n = len(self)
        order = torch.randperm(n, generator=generator) if shuffle else None
        for start in range(0, n, batch_size):
            if order is None:
                idx: torch.Tensor | slice = slice(start, min(start + batch_size, n))
            else:
                idx = order[start : start + batch_size]
            yield self.images(idx), self.y[idx]

    def class_counts(self) -> torch.Tensor:
        """int64 ``[num_classes]``: how many images each class has."""
        return torch.bincount(self.y, minlength=self.num_classes)


def _image_set(x: torch.Tensor, y: torch.Tensor, class_names: tuple[str, ...], source: str) -> ImageSet:
    try:
        return ImageSet(x, y, class_names)
    except ValueError as exc:
        raise DataError(f"{source}: unexpected contents ({exc}); re-fetch the dataset") from None


# --------------------------------------------------------------------------------------------
# public entry points


def dataset_info(cfg: DataConfig) -> DatasetInfo:
    """Facts about ``cfg.name`` (Tiny-ImageNet's class names are read from disk when present)."""
    name = cfg.name
    if name == "fashion-mnist":
        return DatasetInfo(name, 10, (1, 28, 28), FASHION_MNIST_CLASSES, _EPS_SMALL, (0.2860,), (0.3530,))
    if name == "cifar10":
        return DatasetInfo(
            name, 10, (3, 32, 32), CIFAR10_CLASSES, _EPS_RGB, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
        )
    if name == "cifar100":
        return DatasetInfo(
            name, 100, (3, 32, 32), CIFAR100_CLASSES, _EPS_RGB, (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
        )
    if name == "tiny-imagenet":
        base = _tiny_imagenet_base(cfg)
        names = None if base is None else _tiny_imagenet_names_if_present(base)
        if names is None:
            names = tuple(f"class{i}" for i in range(200))
        return DatasetInfo(
            name, len(names), (3, 64, 64), names, _EPS_RGB, (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)
        )
    if name == "synthetic":
        s = cfg.synthetic
        return DatasetInfo(
            name,
            s.num_classes,
            (s.channels, s.image_size, s.image_size),
            _synthetic_class_names(s.num_classes),
            _EPS_SMALL,
            (0.5,) * s.channels,
            (0.32,) * s.channels,
        )
    raise ValueError(f"unknown dataset {name!r}")  # DataConfig validation rules this out


def dataset_dir(cfg: DataConfig) -> Path:
    """``<data.root>/<data.name>``: the folder ``ferd fetch-data`` writes (a DVC output) and loading reads first."""
    return Path(cfg.root) / cfg.name


def load_split(cfg: DataConfig, split: Split) -> ImageSet:
    """The ``train`` or ``test`` split of ``cfg.name`` (see the module docstring for where it is read)."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if cfg.name == "fashion-mnist":
        return _load_fashion_mnist(cfg, split)
    if cfg.name in ("cifar10", "cifar100"):
        return _load_cifar(cfg, split)
    if cfg.name == "tiny-imagenet":
        return _load_tiny_imagenet(cfg, split)
    if cfg.name == "synthetic":
        return make_synthetic(cfg.synthetic, split)
    raise ValueError(f"unknown dataset {cfg.name!r}")


def class_balanced_indices(y: torch.Tensor, num_classes: int, per_class: int, seed: int) -> torch.Tensor:
    """Indices of up to ``per_class`` samples of every class: the first ones after a ``seed``-ed shuffle.

    Deterministic for a given ``(y, per_class, seed)``; sorted ascending. A class with fewer samples
    contributes all of them.
    """
    if per_class < 1:
        raise ValueError(f"per_class must be >= 1, got {per_class}")
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    labels = y[perm]
    picked = [perm[labels == c][:per_class] for c in range(num_classes)]
    return torch.sort(torch.cat(picked)).values if picked else torch.zeros(0, dtype=torch.long)


def class_balanced_subset(data: ImageSet, per_class: int, seed: int) -> ImageSet:
    """The :func:`class_balanced_indices` subset of ``data`` (original order kept)."""
    return data.subset(class_balanced_indices(data.y, data.num_classes, per_class, seed))


# --------------------------------------------------------------------------------------------
# Fashion-MNIST (IDX files, parsed here)


def _idx_file(directory: Path, base: str) -> Path | None:
    for name in (base, base + ".gz"):
        p = directory / name
        if p.is_file():
            return p
    return None


def _fashion_candidates(root: str | Path) -> list[Path]:
    root = Path(root)
    return [root / sub for sub in _FASHION_SUBDIRS] + list(SYSTEM_FASHION_MNIST_DIRS)


def find_fashion_mnist(root: str | Path) -> Path | None:
    """The first folder holding all four Fashion-MNIST IDX files (see the module docstring), or None."""
    for d in _fashion_candidates(root):
        if all(_idx_file(d, base) is not None for pair in _FASHION_FILES.values() for base in pair):
            return d
    return None


def _read_bytes(path: Path) -> bytes:
    refetch = f"{path}: truncated or corrupt; re-fetch it (run `ferd fetch-data`, with data.download: true if needed)"
    try:
        with open(path, "rb") as f:
            head = f.read(2)
        if head == b"\x1f\x8b":
            with gzip.open(path, "rb") as f:
                return f.read()
        return path.read_bytes()
    except (EOFError, OSError, zlib.error) as exc:  # gzip.BadGzipFile is an OSError
        raise DataError(f"{refetch} ({type(exc).__name__}: {exc})") from None


def read_idx(path: Path, magic: int) -> np.ndarray:
    """An IDX file (gzipped or not) as a uint8 array: ``[N, rows, cols]`` (magic 2051) or ``[N]`` (2049)."""
    return _parse_idx(_read_bytes(path), magic, path)


def _parse_idx(raw: bytes, magic: int, path: Path) -> np.ndarray:
    ndim = 3 if magic == _IDX_IMAGES_MAGIC else 1
    header = 4 * (1 + ndim)
    refetch = "re-fetch it (run `ferd fetch-data`, with data.download: true if needed)"
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX file ({len(raw)} bytes, no complete header); {refetch}")
    fields = np.frombuffer(raw, dtype=">u4", count=1 + ndim)
    if int(fields[0]) != magic:
        raise DataError(
            f"{path}: not an IDX file of the expected kind (magic {int(fields[0])}, expected {magic}); {refetch}"
        )
    dims = tuple(int(v) for v in fields[1:])
    expected = header + math.prod(dims)
    if len(raw) != expected:
        what = "truncated" if len(raw) < expected else "has trailing bytes"
        raise DataError(f"{path}: {what} IDX file ({len(raw)} bytes, the header says {expected}); {refetch}")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims).copy()


def _or_list(places: Sequence[object]) -> str:
    names = [str(p) for p in places]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else names[0]


#: What to do when a dataset is missing: the one command that puts it in place.
_RUN_FETCH = ("run `ferd fetch-data` (or `dvc repro fetch-data`): it copies the folder named by data.source, "
              "or downloads with data.download: true")


def _fashion_not_found(root: str | Path) -> DataError:
    return DataError(
        f"Fashion-MNIST not found in {_or_list(_fashion_candidates(root))}; {_RUN_FETCH} "
        "(without either it copies Debian's dataset-fashion-mnist: make data installs it)"
    )


def _load_fashion_mnist(cfg: DataConfig, split: Split) -> ImageSet:
    directory = find_fashion_mnist(cfg.root)
    if directory is None:
        raise _fashion_not_found(cfg.root)
    img_base, lab_base = _FASHION_FILES[split]
    img_path, lab_path = _idx_file(directory, img_base), _idx_file(directory, lab_base)
    assert img_path is not None and lab_path is not None  # find_fashion_mnist checked
    images = read_idx(img_path, _IDX_IMAGES_MAGIC)
    labels = read_idx(lab_path, _IDX_LABELS_MAGIC)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"{img_path} has {images.shape[0]} images but {lab_path} has {labels.shape[0]} labels; re-fetch both files"
        )
    if labels.size and int(labels.max()) >= 10:
        raise DataError(f"{lab_path}: label {int(labels.max())} out of range 0-9; re-fetch it")
    x = torch.from_numpy(images).unsqueeze(1)
    y = torch.from_numpy(labels.astype(np.int64))
    return _image_set(x, y, FASHION_MNIST_CLASSES, str(img_path))


# --------------------------------------------------------------------------------------------
# CIFAR-10 / CIFAR-100 (torchvision)


def _cifar_class(name: str, verify: bool) -> type:
    from torchvision.datasets import CIFAR10, CIFAR100

    base = CIFAR10 if name == "cifar10" else CIFAR100
    if verify:
        return base

    # torchvision's check_integrity(path, None) only checks that the file exists: dropping the md5s
    # keeps every other behaviour (and the unpickling) of the real class.
    class Unverified(base):  # type: ignore[misc, valid-type]
        train_list = [[f, None] for f, _ in base.train_list]
        test_list = [[f, None] for f, _ in base.test_list]
        meta = {**base.meta, "md5": None}

    Unverified.__name__ = f"Unverified{base.__name__}"
    return Unverified


def _unreadable_batch(exc: BaseException) -> bool:
    """Whether ``exc`` is how torchvision's unpickling of a CIFAR batch reports a damaged file."""
    from ferd.errors import is_unpickling_error

    return isinstance(exc, EOFError | ValueError | KeyError | TypeError | OSError) or is_unpickling_error(exc)


def _cifar_files(cls: type) -> list[str]:
    return [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]


def _cifar_roots(cfg: DataConfig) -> list[Path]:
    """torchvision roots to look in: fetch-data's output ``<root>/<name>``, then ``<root>`` itself."""
    return [dataset_dir(cfg), Path(cfg.root)]


def _load_cifar(cfg: DataConfig, split: Split) -> ImageSet:
    cls = _cifar_class(cfg.name, cfg.verify_checksums)
    pretty = "CIFAR-10" if cfg.name == "cifar10" else "CIFAR-100"
    folders = [r / cls.base_folder for r in _cifar_roots(cfg)]
    folder = next((f for f in folders if f.is_dir()), None)
    if folder is None:
        raise DataError(f"{pretty} not found in {_or_list(folders)}; {_RUN_FETCH}")
    missing = [f for f in _cifar_files(cls) if not (folder / f).is_file()]
    if missing:
        raise DataError(f"{pretty} in {folder} is incomplete (missing {', '.join(missing)}); {_RUN_FETCH}")
    try:
        ds = cls(root=str(folder.parent), train=split == "train", download=False)
    except RuntimeError:
        raise DataError(
            f"{pretty} in {folder} failed its md5 check or is corrupt; re-fetch it (`ferd fetch-data`, "
            "with data.download: true if needed; data.verify_checksums: false for test fixtures)"
        ) from None
    except Exception as exc:  # unreadable files; anything else is a bug and propagates
        if not _unreadable_batch(exc):
            raise
        raise DataError(
            f"{pretty} in {folder} could not be read ({type(exc).__name__}: {exc}); re-fetch it "
            "(`ferd fetch-data`, with data.download: true if needed)"
        ) from None
    data = np.asarray(ds.data, dtype=np.uint8)
    x = torch.from_numpy(np.ascontiguousarray(data.transpose(0, 3, 1, 2)))
    y = torch.as_tensor(np.asarray(ds.targets, dtype=np.int64))
    return _image_set(x, y, tuple(str(c) for c in ds.classes), str(folder))


# --------------------------------------------------------------------------------------------
# Tiny-ImageNet (folder of JPEGs)


def _tiny_imagenet_names_if_present(base: Path) -> tuple[str, ...] | None:
    wnids_file = base / "wnids.txt"
    if not wnids_file.is_file():
        return None
    wnids = sorted({w.strip() for w in wnids_file.read_text().split() if w.strip()})
    words: dict[str, str] = {}
    words_file = base / "words.txt"
    if words_file.is_file():
        for line in words_file.read_text(encoding="utf-8", errors="replace").splitlines():
            wnid, _, text = line.partition("\t")
            if text.strip():
                words[wnid.strip()] = text.split(",")[0].strip()
    return tuple(words.get(w, w) for w in wnids)


def _tiny_imagenet_bases(cfg: DataConfig) -> list[Path]:
    return [dataset_dir(cfg) / TINY_IMAGENET_DIR, Path(cfg.root) / TINY_IMAGENET_DIR]


def _tiny_imagenet_base(cfg: DataConfig) -> Path | None:
    """The first ``tiny-imagenet-200`` folder with a wnids.txt: fetch-data's output, then ``<root>``."""
    return next((b for b in _tiny_imagenet_bases(cfg) if (b / "wnids.txt").is_file()), None)


def _load_tiny_imagenet(cfg: DataConfig, split: Split) -> ImageSet:
    base = _tiny_imagenet_base(cfg)
    if base is None:
        raise DataError(
            f"Tiny-ImageNet not found in {_or_list(_tiny_imagenet_bases(cfg))} (no wnids.txt); {_RUN_FETCH} "
            f"({TINY_IMAGENET_URL})"
        )
    wnids = sorted({w.strip() for w in (base / "wnids.txt").read_text().split() if w.strip()})
    names = _tiny_imagenet_names_if_present(base)
    assert names is not None
    label_of = {w: i for i, w in enumerate(wnids)}
    items: list[tuple[Path, int]] = []
    if split == "train":
        for w in wnids:
            folder = base / "train" / w / "images"
            if not folder.is_dir():
                raise DataError(f"Tiny-ImageNet: {folder} is missing; re-extract tiny-imagenet-200")
            items += [(p, label_of[w]) for p in sorted(folder.iterdir()) if p.suffix.lower() in (".jpeg", ".jpg")]
    else:
        ann = base / "val" / "val_annotations.txt"
        if not ann.is_file():
            raise DataError(f"Tiny-ImageNet: {ann} is missing; re-extract tiny-imagenet-200")
        for n, line in enumerate(ann.read_text().splitlines(), 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) < 2 or parts[1] not in label_of:
                raise DataError(f"{ann}:{n}: expected '<file> <wnid> ...' with a wnid from wnids.txt, got {line!r}")
            items.append((base / "val" / "images" / parts[0], label_of[parts[1]]))
    if not items:
        raise DataError(f"Tiny-ImageNet in {base}: the {split} split has no images; re-extract tiny-imagenet-200")
    return _image_set(*_read_images(items), names, str(base))


def _read_images(items: list[tuple[Path, int]]) -> tuple[torch.Tensor, torch.Tensor]:
    from PIL import Image

    out: np.ndarray | None = None
    for i, (path, _) in enumerate(items):
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path}: cannot read the image ({exc}); re-extract the dataset") from None
        if out is None:
            out = np.empty((len(items), *arr.shape), dtype=np.uint8)
        elif arr.shape != out.shape[1:]:
            raise DataError(
                f"{path}: image size {arr.shape[1]}x{arr.shape[0]} differs from "
                f"{out.shape[2]}x{out.shape[1]} of the others; re-extract the dataset"
            )
        out[i] = arr
    assert out is not None
    x = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
    y = torch.as_tensor([label for _, label in items], dtype=torch.int64)
    return x, y


# --------------------------------------------------------------------------------------------
# synthetic

_SYNTH_SEED = 0xFE4D
_SYNTH_GRID = 4  # prototypes are GRID x GRID blocks per channel
_SYNTH_LOW, _SYNTH_HIGH = 0.2, 0.8
_SYNTH_NOISE = 0.12
_SYNTH_JITTER = 0.05


def _synthetic_class_names(num_classes: int) -> tuple[str, ...]:
    return tuple(f"class{i}" for i in range(num_classes))


def _synthetic_codes(num_classes: int, channels: int) -> np.ndarray:
    """Binary block codes ``[K, C, G, G]``; class k's code depends only on k (drawn in order, kept apart)."""
    rng = np.random.default_rng([_SYNTH_SEED, 0])
    bits = channels * _SYNTH_GRID * _SYNTH_GRID
    min_dist = max(1, bits // 4)
    codes: list[np.ndarray] = []
    for _ in range(num_classes):
        best, best_d = None, -1
        for _attempt in range(200):
            cand = rng.integers(0, 2, size=bits, dtype=np.int8)
            d = min((int(np.sum(cand != c)) for c in codes), default=bits)
            if d > best_d:
                best, best_d = cand, d
            if d >= min_dist:
                break
        assert best is not None
        codes.append(best)
    return np.stack(codes).reshape(num_classes, channels, _SYNTH_GRID, _SYNTH_GRID)


def synthetic_prototypes(cfg: SyntheticDataConfig) -> np.ndarray:
    """float32 ``[K, C, S, S]`` class prototypes in ``[0, 1]`` (nearest-neighbour upsampled block codes)."""
    codes = _synthetic_codes(cfg.num_classes, cfg.channels).astype(np.float32)
    cell = -(-cfg.image_size // _SYNTH_GRID)
    up = codes.repeat(cell, axis=2).repeat(cell, axis=3)[:, :, : cfg.image_size, : cfg.image_size]
    return _SYNTH_LOW + (_SYNTH_HIGH - _SYNTH_LOW) * up


def make_synthetic(cfg: SyntheticDataConfig, split: Split) -> ImageSet:
    """The generated dataset (module docstring); labels cycle 0, 1, ..., K-1, 0, 1, ..."""
    per_class = cfg.train_per_class if split == "train" else cfg.test_per_class
    k = cfg.num_classes
    n = k * per_class
    protos = synthetic_prototypes(cfg)
    rng = np.random.default_rng([_SYNTH_SEED, 1 if split == "train" else 2])
    labels = np.arange(n, dtype=np.int64) % k
    imgs = protos[labels].copy()
    shifts = rng.integers(-1, 2, size=(n, 2))
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            sel = (shifts[:, 0] == dy) & (shifts[:, 1] == dx)
            if (dy or dx) and sel.any():
                imgs[sel] = np.roll(imgs[sel], shift=(dy, dx), axis=(2, 3))
    imgs += rng.uniform(-_SYNTH_JITTER, _SYNTH_JITTER, size=(n, 1, 1, 1)).astype(np.float32)
    imgs += rng.normal(0.0, _SYNTH_NOISE, size=imgs.shape).astype(np.float32)
    x = np.clip(np.rint(imgs * 255.0), 0, 255).astype(np.uint8)
    return ImageSet(torch.from_numpy(x), torch.from_numpy(labels), _synthetic_class_names(k))


# --------------------------------------------------------------------------------------------
# fetch-data: the dataset as a DVC stage output


@dataclass(frozen=True)
class FetchResult:
    """What :func:`fetch_dataset` put where, from where, and how it was checked."""

    dataset: str
    path: Path  # the dataset folder, <data.root>/<data.name>
    source: str  # where the files came from (for the summary; not written into the output)
    files: int  # data files written (the manifest not counted)
    bytes: int
    checked: str  # what was verified


def fetch_dataset(cfg: DataConfig, *, progress: Progress = no_progress) -> FetchResult:
    """Put ``cfg.name`` into :func:`dataset_dir` (``<data.root>/<data.name>``), checked, replacing what was there.

    Where the files come from, first match wins: the folder or archive ``data.source`` names; the
    usual places (Debian's ``/usr/share/datasets/fashion-mnist`` for Fashion-MNIST, and the older
    layouts directly under ``<root>``: ``FashionMNIST/raw``, ``cifar-10-batches-py``,
    ``cifar-100-python``, ``tiny-imagenet-200``); a download (torchvision's URLs) when
    ``data.download`` is true. Nothing found is a :class:`DataError` saying what to set.

    The output holds only the dataset's own files (Fashion-MNIST decompressed) plus a manifest
    (:data:`FETCH_MANIFEST`: the dataset, file count and size; for ``synthetic`` its params), all
    determined by the data alone, so every way of fetching the same dataset gives the same bytes
    and the same DVC hash. The folder is built next to its destination and renamed into place:
    a failure leaves no half-written dataset.
    """
    dest = dataset_dir(cfg)
    fetchers = {"fashion-mnist": _fetch_fashion_mnist, "cifar10": _fetch_cifar, "cifar100": _fetch_cifar,
                "tiny-imagenet": _fetch_tiny_imagenet, "synthetic": _fetch_synthetic}
    if cfg.name not in fetchers:
        raise ValueError(f"unknown dataset {cfg.name!r}")  # DataConfig validation rules this out
    if cfg.source and not Path(cfg.source).expanduser().is_absolute():
        raise DataError(f"data.source: {cfg.source!r} is a relative path; give an absolute one (queued experiments "
                        "run fetch-data in another folder)")
    if cfg.source and not Path(cfg.source).expanduser().exists():
        raise DataError(f"data.source: {cfg.source} does not exist; name the folder (or archive) holding {cfg.name}, "
                        "as an absolute path, or set data.source: \"\"")
    with _staged_dir(dest) as stage:
        source, checked, extra = fetchers[cfg.name](cfg, stage, progress)
        files = sorted(p for p in stage.rglob("*") if p.is_file())
        total = sum(p.stat().st_size for p in files)
        manifest = {"dataset": cfg.name, "files": len(files), "bytes": total, "format_version": 1, **extra}
        from ferd.artifacts import save_json

        save_json(stage / FETCH_MANIFEST, manifest)
    return FetchResult(cfg.name, dest, source, len(files), total, checked)


@contextlib.contextmanager
def _staged_dir(dest: Path) -> Iterator[Path]:
    """A fresh folder next to ``dest``; on success it replaces ``dest``, on failure it is deleted.

    Named ``.<dest.name>.<pid>.<random>.tmp``; folders of writers that no longer run are removed
    first (a SIGKILLed fetch cannot clean up after itself).
    """
    dest.parent.mkdir(parents=True, exist_ok=True)
    prefix = f".{dest.name}."
    for old in dest.parent.glob(f"{prefix}*.tmp"):
        pid = old.name[len(prefix):].split(".", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    stage = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}.", suffix=".tmp", dir=dest.parent))
    try:
        yield stage
        os.chmod(stage, 0o755)
        if dest.is_symlink() or dest.is_file():
            dest.unlink()
        elif dest.exists():
            trash = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}.", suffix=".tmp", dir=dest.parent))
            os.replace(dest, trash / "old")
            os.replace(stage, dest)
            shutil.rmtree(trash, ignore_errors=True)
            return
        os.replace(stage, dest)
    finally:
        if stage.exists():
            shutil.rmtree(stage, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def _md5_bytes(data: bytes) -> str:
    return hashlib.md5(data, usedforsecurity=False).hexdigest()


def _md5_file(path: Path) -> str:
    h = hashlib.md5(usedforsecurity=False)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _user_source(cfg: DataConfig) -> Path | None:
    return Path(cfg.source).expanduser() if cfg.source else None


def _download_failed(what: str, exc: BaseException) -> DataError:
    return DataError(f"{what} download failed ({type(exc).__name__}: {exc}); check the network, or name a copy with "
                     "data.source")


def _not_found(pretty: str, looked: Sequence[Path], *, debian: bool = False) -> DataError:
    extra = "install Debian's dataset-fashion-mnist (make data), " if debian else ""
    return DataError(f"{pretty} not found in {_or_list(looked)}; {extra}name a copy with data.source: /absolute/folder "
                     "or set data.download: true")


_UNCHECKED = "not checked (data.verify_checksums: false)"


# Fashion-MNIST -------------------------------------------------------------------------------


def _fetch_fashion_mnist(cfg: DataConfig, stage: Path, progress: Progress) -> tuple[str, str, dict]:
    user = _user_source(cfg)
    if user is not None:
        looked = [user, user / "fashion-mnist", user / "FashionMNIST" / "raw"]
    else:
        looked = [*SYSTEM_FASHION_MNIST_DIRS, Path(cfg.root) / "FashionMNIST" / "raw"]
    bases = [b for pair in _FASHION_FILES.values() for b in pair]
    folder = next((d for d in looked if all(_idx_file(d, b) is not None for b in bases)), None)
    source = f"data.source {user}" if user is not None else str(folder)
    if folder is None:
        if user is not None:
            raise DataError(f"data.source: no Fashion-MNIST IDX files ({', '.join(bases)}, gzipped or not) in "
                            f"{_or_list(looked)}")
        if not cfg.download:
            raise _not_found("Fashion-MNIST", looked, debian=True)
        from torchvision.datasets import FashionMNIST

        try:  # torchvision checks the md5s of the .gz files it downloads (FashionMNIST.resources)
            FashionMNIST(str(stage / ".download"), train=True, download=True)
        except (OSError, RuntimeError, ValueError) as exc:  # network / archive failures (URLError is an OSError)
            raise _download_failed("Fashion-MNIST", exc) from None
        folder = stage / ".download" / "FashionMNIST" / "raw"
        source = f"a download from {FashionMNIST.mirrors[0]}"
    for i, base in enumerate(bases):
        path = _idx_file(folder, base)
        assert path is not None
        raw = _read_bytes(path)
        if cfg.verify_checksums and _md5_bytes(raw) != FASHION_MNIST_IDX_MD5[base]:
            raise DataError(f"{path}: its content's md5 is {_md5_bytes(raw)}, not the published Fashion-MNIST's "
                            f"{FASHION_MNIST_IDX_MD5[base]}; replace the file (data.verify_checksums: false skips the check)")
        _parse_idx(raw, _IDX_LABELS_MAGIC if "labels" in base else _IDX_IMAGES_MAGIC, path)
        (stage / base).write_bytes(raw)
        progress("fetch-data", i + 1, len(bases), {})
    shutil.rmtree(stage / ".download", ignore_errors=True)
    return source, "content md5s verified" if cfg.verify_checksums else _UNCHECKED, {}


# CIFAR-10 / CIFAR-100 --------------------------------------------------------------------------


def _fetch_cifar(cfg: DataConfig, stage: Path, progress: Progress) -> tuple[str, str, dict]:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if cfg.name == "cifar10" else CIFAR100
    pretty = "CIFAR-10" if cfg.name == "cifar10" else "CIFAR-100"
    md5s = {f: m for f, m in cls.train_list + cls.test_list} | {cls.meta["filename"]: cls.meta["md5"]}
    checked = "md5s verified (torchvision's published values)" if cfg.verify_checksums else _UNCHECKED

    def complete(d: Path) -> bool:
        return all((d / f).is_file() for f in md5s)

    user = _user_source(cfg)
    folder: Path | None
    if user is not None and user.is_file():
        folder = _extract(user, stage / ".download", cls.tgz_md5 if cfg.verify_checksums else None, pretty) / cls.base_folder
        source = f"data.source {user}"
        if not complete(folder):
            raise DataError(f"data.source: {user} is not the {pretty} archive ({cls.filename}): no {cls.base_folder}/ "
                            "with the batch files inside")
    else:
        looked = [user / cls.base_folder, user] if user is not None else [Path(cfg.root) / cls.base_folder]
        folder = next((d for d in looked if complete(d)), None)
        source = f"data.source {user}" if user is not None else str(folder)
        if folder is None and user is not None:
            raise DataError(f"data.source: no {pretty} batch files ({', '.join(md5s)}) in {_or_list(looked)}; name the "
                            f"folder holding {cls.base_folder}/ or the {cls.filename} archive")
        if folder is None:
            if not cfg.download:
                raise _not_found(pretty, looked)
            from torchvision.datasets.utils import download_url

            try:
                download_url(cls.url, str(stage / ".download"), cls.filename, cls.tgz_md5 if cfg.verify_checksums else None)
            except (OSError, RuntimeError, ValueError) as exc:
                raise _download_failed(pretty, exc) from None
            archive = stage / ".download" / cls.filename
            folder = _extract(archive, stage / ".download", None, pretty) / cls.base_folder
            source = f"a download from {cls.url}"
    out = stage / cls.base_folder
    out.mkdir()
    for i, (name, md5) in enumerate(md5s.items()):
        if cfg.verify_checksums and _md5_file(folder / name) != md5:
            raise DataError(f"{folder / name}: md5 {_md5_file(folder / name)} is not {pretty}'s published {md5}; "
                            "replace the file (data.verify_checksums: false skips the check)")
        shutil.copyfile(folder / name, out / name)
        progress("fetch-data", i + 1, len(md5s), {})
    shutil.rmtree(stage / ".download", ignore_errors=True)
    return source, checked, {}


def _extract(archive: Path, into: Path, md5: str | None, pretty: str) -> Path:
    """Unpack a .tar.gz / .tgz / .zip ``archive`` into ``into`` (its md5 checked first when given); returns ``into``."""
    import tarfile
    import zipfile

    if md5 is not None and _md5_file(archive) != md5:
        raise DataError(f"{archive}: md5 {_md5_file(archive)} is not {pretty}'s published {md5}; replace the archive "
                        "(data.verify_checksums: false skips the check)")
    into.mkdir(parents=True, exist_ok=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                z.extractall(into)  # zipfile drops absolute paths and ".." itself
        else:
            with tarfile.open(archive) as t:
                for m in t.getmembers():
                    if not (m.isfile() or m.isdir()) or m.name.startswith("/") or ".." in Path(m.name).parts:
                        raise DataError(f"{archive}: unexpected member {m.name!r}; not a dataset archive")
                if hasattr(tarfile, "data_filter"):  # Python >= 3.10.12 / 3.11.4: refuse anything outside `into`
                    t.extractall(into, filter="data")
                else:
                    t.extractall(into)
    except (OSError, EOFError, tarfile.TarError, zipfile.BadZipFile) as exc:
        raise DataError(f"{archive}: cannot unpack it ({type(exc).__name__}: {exc}); replace the archive") from None
    return into


# Tiny-ImageNet -----------------------------------------------------------------------------------


def _fetch_tiny_imagenet(cfg: DataConfig, stage: Path, progress: Progress) -> tuple[str, str, dict]:
    user = _user_source(cfg)
    zip_checked = f"zip md5 verified ({TINY_IMAGENET_ZIP_MD5})"
    if user is not None and user.is_file():
        base = _extract(user, stage / ".download", TINY_IMAGENET_ZIP_MD5 if cfg.verify_checksums else None,
                        "Tiny-ImageNet") / TINY_IMAGENET_DIR
        source, checked = f"data.source {user}", zip_checked
    else:
        looked = [user / TINY_IMAGENET_DIR, user] if user is not None else [Path(cfg.root) / TINY_IMAGENET_DIR]
        found = next((d for d in looked if (d / "wnids.txt").is_file()), None)
        source, checked = f"data.source {user}" if user is not None else str(found), "file counts checked (no published md5s)"
        if found is None and user is not None:
            raise DataError(f"data.source: no Tiny-ImageNet (wnids.txt) in {_or_list(looked)}; name the folder holding "
                            f"{TINY_IMAGENET_DIR}/ or the {TINY_IMAGENET_URL.rsplit('/', 1)[1]} archive")
        if found is None:
            if not cfg.download:
                raise _not_found("Tiny-ImageNet", looked)
            from torchvision.datasets.utils import download_url

            name = TINY_IMAGENET_URL.rsplit("/", 1)[1]
            try:
                download_url(TINY_IMAGENET_URL, str(stage / ".download"), name,
                             TINY_IMAGENET_ZIP_MD5 if cfg.verify_checksums else None)
            except (OSError, RuntimeError, ValueError) as exc:
                raise _download_failed("Tiny-ImageNet", exc) from None
            found = _extract(stage / ".download" / name, stage / ".download", None, "Tiny-ImageNet") / TINY_IMAGENET_DIR
            source, checked = f"a download from {TINY_IMAGENET_URL}", zip_checked
        base = found
    if not (base / "wnids.txt").is_file():
        raise DataError(f"{base}: no wnids.txt; not a Tiny-ImageNet-200 folder")
    wnids = sorted({w.strip() for w in (base / "wnids.txt").read_text().split() if w.strip()})
    files = [base / "wnids.txt"]
    if (base / "words.txt").is_file():
        files.append(base / "words.txt")
    per_class = []
    for w in wnids:
        images = sorted(p for p in (base / "train" / w / "images").glob("*") if p.suffix.lower() in (".jpeg", ".jpg"))
        per_class.append(len(images))
        files += images
    val = sorted(p for p in (base / "val" / "images").glob("*") if p.suffix.lower() in (".jpeg", ".jpg"))
    files += val + [base / "val" / "val_annotations.txt"]
    if cfg.verify_checksums:
        want = TINY_IMAGENET_COUNTS
        got = {"classes": len(wnids), "train_per_class": min(per_class, default=0), "val": len(val)}
        if got != want or max(per_class, default=0) != want["train_per_class"]:
            raise DataError(f"{base}: {got['classes']} classes, {min(per_class, default=0)}-{max(per_class, default=0)} "
                            f"train images per class and {got['val']} val images, expected {want['classes']}, "
                            f"{want['train_per_class']} and {want['val']}; re-extract tiny-imagenet-200 "
                            "(data.verify_checksums: false skips the check)")
    if not (base / "val" / "val_annotations.txt").is_file():
        raise DataError(f"{base}: val/val_annotations.txt is missing; re-extract tiny-imagenet-200")
    out = stage / TINY_IMAGENET_DIR
    for i, f in enumerate(files):
        target = out / f.relative_to(base)
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, target)
        if (i + 1) % 1000 == 0 or i + 1 == len(files):
            progress("fetch-data", i + 1, len(files), {})
    shutil.rmtree(stage / ".download", ignore_errors=True)
    return source, checked if cfg.verify_checksums else _UNCHECKED, {}


# synthetic ------------------------------------------------------------------------------------


def _fetch_synthetic(cfg: DataConfig, stage: Path, progress: Progress) -> tuple[str, str, dict]:
    progress("fetch-data", 1, 1, {})
    return "generated on load (only the manifest is written)", "nothing to check", {"synthetic": asdict(cfg.synthetic)}
