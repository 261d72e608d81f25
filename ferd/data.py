"""Datasets as in-memory uint8 tensors: what each one is and where it is looked for.

Every split is returned as an :class:`ImageSet` (``x`` uint8 ``[N, C, H, W]``, ``y`` int64 ``[N]``);
models see float32 images in ``[0, 1]`` (:meth:`ImageSet.images`, :meth:`ImageSet.batches`), any
normalisation lives inside the model. ``cfg`` below is a :class:`ferd.config.DataConfig`.

``fashion-mnist``
    Zalando's Fashion-MNIST: 60000 train / 10000 test grey 28x28 images, 10 classes. The IDX files
    (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``,
    ``t10k-labels-idx1-ubyte``, gzipped or not) are parsed here with numpy. Looked for, in order,
    in ``<root>/fashion-mnist/``, ``<root>/FashionMNIST/raw/`` (torchvision's layout) and Debian's
    ``/usr/share/datasets/fashion-mnist/`` (package ``dataset-fashion-mnist``). With
    ``data.download: true`` a missing copy is fetched by torchvision into ``<root>/FashionMNIST/raw``.
``cifar10`` / ``cifar100``
    CIFAR-10 / CIFAR-100 (fine labels): 50000 train / 10000 test RGB 32x32 images, read by
    torchvision from ``<root>/cifar-10-batches-py/`` / ``<root>/cifar-100-python/`` (the official
    python pickles; torchvision's unpickling is the one place the project reads pickles). The md5
    checks can be switched off (``data.verify_checksums: false``) so tiny test fixtures load.
``tiny-imagenet``
    Tiny-ImageNet-200: 100000 train / 10000 val RGB 64x64 JPEGs, 200 classes, in the standard
    ``<root>/tiny-imagenet-200/`` layout (``wnids.txt``, ``words.txt``, ``train/<wnid>/images/``,
    ``val/images/`` + ``val/val_annotations.txt``). The ``test`` split is the labelled val folder.
    Classes are ordered by sorted wnid.
``synthetic``
    A generated, deterministic dataset for tests and quick checks (``data.synthetic``): each class
    is a fixed random block pattern, every image adds Gaussian noise, a brightness jitter and a shift
    of at most one pixel. Train and test use different noise seeds. Nothing is read from disk.

Failures a user can fix (missing, truncated or corrupt files) raise :class:`ferd.errors.DataError`
with a message saying where we looked and what to do.
"""

from __future__ import annotations

import gzip
import math
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch

from ferd.config import DataConfig, SyntheticDataConfig
from ferd.errors import DataError

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
        names = _tiny_imagenet_names_if_present(Path(cfg.root) / TINY_IMAGENET_DIR)
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
    refetch = f"{path}: truncated or corrupt; re-fetch it (delete it and run make data, or set data.download: true)"
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
    raw = _read_bytes(path)
    ndim = 3 if magic == _IDX_IMAGES_MAGIC else 1
    header = 4 * (1 + ndim)
    refetch = "re-fetch it (delete it and run make data, or set data.download: true)"
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


def _fashion_not_found(root: str | Path) -> DataError:
    places = [str(p) for p in _fashion_candidates(root)]
    where = ", ".join(places[:-1]) + " or " + places[-1] if len(places) > 1 else places[0]
    return DataError(
        f"Fashion-MNIST not found in {where}; install Debian's dataset-fashion-mnist (make data) "
        "or set data.download: true"
    )


def _load_fashion_mnist(cfg: DataConfig, split: Split) -> ImageSet:
    directory = find_fashion_mnist(cfg.root)
    if directory is None and cfg.download:
        from torchvision.datasets import FashionMNIST

        try:
            FashionMNIST(cfg.root, train=True, download=True)
        except (OSError, RuntimeError, ValueError) as exc:  # network / archive failures (URLError is an OSError)
            raise DataError(
                f"Fashion-MNIST download into {Path(cfg.root) / 'FashionMNIST/raw'} failed "
                f"({type(exc).__name__}: {exc}); check the network or install dataset-fashion-mnist"
            ) from None
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


def _load_cifar(cfg: DataConfig, split: Split) -> ImageSet:
    cls = _cifar_class(cfg.name, cfg.verify_checksums)
    pretty = "CIFAR-10" if cfg.name == "cifar10" else "CIFAR-100"
    folder = Path(cfg.root) / cls.base_folder
    files = [f for f, _ in cls.train_list + cls.test_list] + [cls.meta["filename"]]
    missing = [f for f in files if not (folder / f).is_file()]
    if missing and not cfg.download:
        raise DataError(
            f"{pretty} not found in {folder} (missing {', '.join(missing)}); set data.download: true "
            f"to fetch it (or use data.verify_checksums: false for test fixtures)"
        )
    try:
        ds = cls(root=cfg.root, train=split == "train", download=cfg.download)
    except RuntimeError as exc:
        if missing:
            raise DataError(f"{pretty} download into {folder} failed ({exc}); check the network") from None
        raise DataError(
            f"{pretty} in {folder} failed its md5 check or is corrupt; delete it and set data.download: true "
            "to re-fetch it (or data.verify_checksums: false for test fixtures)"
        ) from None
    except Exception as exc:  # unreadable files; anything else is a bug and propagates
        if not _unreadable_batch(exc):
            raise
        raise DataError(
            f"{pretty} in {folder} could not be read ({type(exc).__name__}: {exc}); delete it and set "
            "data.download: true to re-fetch it"
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


def _load_tiny_imagenet(cfg: DataConfig, split: Split) -> ImageSet:
    base = Path(cfg.root) / TINY_IMAGENET_DIR
    if not (base / "wnids.txt").is_file() and cfg.download:
        from torchvision.datasets.utils import download_and_extract_archive

        try:
            download_and_extract_archive(TINY_IMAGENET_URL, str(cfg.root))
        except (OSError, RuntimeError, ValueError) as exc:  # network / archive failures
            raise DataError(f"Tiny-ImageNet download into {cfg.root} failed ({type(exc).__name__}: {exc})") from None
    if not (base / "wnids.txt").is_file():
        raise DataError(
            f"Tiny-ImageNet not found in {base} (no wnids.txt); unzip {TINY_IMAGENET_URL} into {cfg.root} "
            "or set data.download: true"
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
