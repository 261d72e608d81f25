"""ferd.data: loaders on tiny on-disk fixtures, the synthetic set, ImageSet helpers, dataset_info."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest
import torch

import ferd.data as data_mod
from ferd.config import DataConfig, SyntheticDataConfig
from ferd.data import (
    ImageSet,
    class_balanced_subset,
    dataset_info,
    find_fashion_mnist,
    load_split,
)
from ferd.errors import DataError
from tests.fixtures import (
    write_cifar10_batches,
    write_cifar100_python,
    write_fashion_mnist_idx,
    write_tiny_imagenet,
)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def no_system_fmnist(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide Debian's /usr/share/datasets/fashion-mnist so only the test's root is searched."""
    monkeypatch.setattr(data_mod, "SYSTEM_FASHION_MNIST_DIRS", ())


def small_set(n: int = 23, k: int = 3) -> ImageSet:
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (n, 1, 4, 4), dtype=torch.uint8, generator=g)
    y = torch.arange(n) % k
    return ImageSet(x, y, tuple(f"c{i}" for i in range(k)))


# --------------------------------------------------------------------------------------------
# Fashion-MNIST


@pytest.mark.usefixtures("no_system_fmnist")
def test_fashion_mnist_fixture_loads(tmp_path: Path) -> None:
    write_fashion_mnist_idx(tmp_path / "fashion-mnist", n_train=40, n_test=20)
    cfg = DataConfig(name="fashion-mnist", root=str(tmp_path))
    assert find_fashion_mnist(tmp_path) == tmp_path / "fashion-mnist"
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert train.x.shape == (40, 1, 28, 28) and test.x.shape == (20, 1, 28, 28)
    assert train.x.dtype == torch.uint8 and train.y.dtype == torch.int64
    assert torch.equal(train.y, torch.arange(40) % 10)
    assert train.class_names[0] == "T-shirt/top" and train.num_classes == 10
    imgs = train.images()
    assert imgs.dtype == torch.float32 and 0.0 <= float(imgs.min()) and float(imgs.max()) <= 1.0
    assert float(imgs.max()) > 0.9  # uint8 -> [0, 1], not left at 0..255 or collapsed


@pytest.mark.usefixtures("no_system_fmnist")
def test_fashion_mnist_torchvision_layout_uncompressed(tmp_path: Path) -> None:
    write_fashion_mnist_idx(tmp_path / "FashionMNIST" / "raw", n_train=12, n_test=5, compress=False)
    test = load_split(DataConfig(name="fashion-mnist", root=str(tmp_path)), "test")
    assert len(test) == 5 and test.image_shape == (1, 28, 28)


@pytest.mark.usefixtures("no_system_fmnist")
@pytest.mark.parametrize("compress", [True, False])
def test_fashion_mnist_truncated_file(tmp_path: Path, compress: bool) -> None:
    folder = write_fashion_mnist_idx(tmp_path / "fashion-mnist", compress=compress)
    name = "train-images-idx3-ubyte" + (".gz" if compress else "")
    path = folder / name
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(DataError, match="train-images-idx3-ubyte") as err:
        load_split(DataConfig(name="fashion-mnist", root=str(tmp_path)), "train")
    assert "re-fetch" in str(err.value)
    # the test split is untouched and still loads
    assert len(load_split(DataConfig(name="fashion-mnist", root=str(tmp_path)), "test")) == 20


@pytest.mark.usefixtures("no_system_fmnist")
def test_fashion_mnist_wrong_magic(tmp_path: Path) -> None:
    folder = write_fashion_mnist_idx(tmp_path / "fashion-mnist")
    # swap: a labels file where the images file should be
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes((folder / "t10k-labels-idx1-ubyte.gz").read_bytes())
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.*magic 2049"):
        load_split(DataConfig(name="fashion-mnist", root=str(tmp_path)), "test")


@pytest.mark.usefixtures("no_system_fmnist")
def test_fashion_mnist_label_count_mismatch(tmp_path: Path) -> None:
    folder = write_fashion_mnist_idx(tmp_path / "fashion-mnist", n_train=10, n_test=6)
    other = write_fashion_mnist_idx(tmp_path / "other", n_train=10, n_test=7)
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes((other / "t10k-labels-idx1-ubyte.gz").read_bytes())
    with pytest.raises(DataError, match="6 images but .* 7 labels"):
        load_split(DataConfig(name="fashion-mnist", root=str(tmp_path)), "test")


@pytest.mark.usefixtures("no_system_fmnist")
def test_fashion_mnist_missing(tmp_path: Path) -> None:
    assert find_fashion_mnist(tmp_path) is None
    with pytest.raises(DataError, match="data.download: true") as err:
        load_split(DataConfig(name="fashion-mnist", root=str(tmp_path)), "train")
    assert "Fashion-MNIST not found" in str(err.value) and str(tmp_path / "fashion-mnist") in str(err.value)


def test_fashion_mnist_gzip_is_detected_by_content(tmp_path: Path, no_system_fmnist: None) -> None:
    folder = write_fashion_mnist_idx(tmp_path / "fashion-mnist", n_train=3, n_test=3, compress=False)
    p = folder / "t10k-images-idx3-ubyte"
    (folder / "t10k-images-idx3-ubyte.gz").write_bytes(gzip.compress(p.read_bytes()))
    p.unlink()
    assert len(load_split(DataConfig(name="fashion-mnist", root=str(tmp_path)), "test")) == 3


def _real_fashion_dir() -> Path | None:
    return find_fashion_mnist(REPO / "data" / "raw")


@pytest.mark.slow
@pytest.mark.skipif(
    _real_fashion_dir() is None,
    reason="real Fashion-MNIST not installed (data/raw or /usr/share/datasets/fashion-mnist; run make data)",
)
def test_real_fashion_mnist_test_split() -> None:
    test = load_split(DataConfig(name="fashion-mnist", root=str(REPO / "data" / "raw")), "test")
    assert test.x.shape == (10000, 1, 28, 28)
    assert test.class_counts().tolist() == [1000] * 10


# --------------------------------------------------------------------------------------------
# CIFAR


def test_cifar10_fixture_loads_without_checksums(tmp_path: Path) -> None:
    write_cifar10_batches(tmp_path, n_per_batch=10)
    cfg = DataConfig(name="cifar10", root=str(tmp_path), verify_checksums=False)
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert train.x.shape == (50, 3, 32, 32) and test.x.shape == (10, 3, 32, 32)
    assert train.x.dtype == torch.uint8 and train.y.dtype == torch.int64
    assert train.class_names == dataset_info(cfg).class_names
    assert test.class_counts().tolist() == [1] * 10


def test_cifar_layout_is_chw_from_rgb_planes(tmp_path: Path) -> None:
    from tests.fixtures import _cifar_rows

    write_cifar10_batches(tmp_path, n_per_batch=2, seed=0)
    rng = np.random.default_rng(0)  # replay the writer's draws: 5 train batches, then the test batch
    for _ in range(5):
        _cifar_rows(rng, 2)
    rows = _cifar_rows(rng, 2)
    test = load_split(DataConfig(name="cifar10", root=str(tmp_path), verify_checksums=False), "test")
    # row layout: 1024 R (row-major 32x32), then G, then B
    assert torch.equal(test.x[1], torch.from_numpy(rows[1].reshape(3, 32, 32)))


def test_cifar100_fixture_loads_without_checksums(tmp_path: Path) -> None:
    write_cifar100_python(tmp_path, n_train=20, n_test=10)
    cfg = DataConfig(name="cifar100", root=str(tmp_path), verify_checksums=False)
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert train.x.shape == (20, 3, 32, 32) and test.x.shape == (10, 3, 32, 32)
    assert train.num_classes == 100 and train.class_names[3] == "fine03"
    assert torch.equal(train.y, torch.arange(20))


@pytest.mark.parametrize(("name", "writer"), [("cifar10", write_cifar10_batches), ("cifar100", write_cifar100_python)])
def test_cifar_fixture_fails_md5_with_checksums(tmp_path: Path, name: str, writer) -> None:
    writer(tmp_path)
    with pytest.raises(DataError, match="md5") as err:
        load_split(DataConfig(name=name, root=str(tmp_path), verify_checksums=True), "train")
    assert "verify_checksums: false" in str(err.value)


@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_missing(tmp_path: Path, name: str) -> None:
    with pytest.raises(DataError, match="not found in .*data.download: true"):
        load_split(DataConfig(name=name, root=str(tmp_path), verify_checksums=False), "test")


def test_cifar_corrupt_pickle_is_a_data_error(tmp_path: Path) -> None:
    folder = write_cifar10_batches(tmp_path)
    (folder / "test_batch").write_bytes(b"not a pickle at all")
    with pytest.raises(DataError, match="could not be read"):
        load_split(DataConfig(name="cifar10", root=str(tmp_path), verify_checksums=False), "test")


# --------------------------------------------------------------------------------------------
# Tiny-ImageNet


def test_tiny_imagenet_fixture_loads(tmp_path: Path) -> None:
    write_tiny_imagenet(tmp_path, n_classes=3, n_train=2, n_val=2, size=64)
    cfg = DataConfig(name="tiny-imagenet", root=str(tmp_path))
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    assert train.x.shape == (6, 3, 64, 64) and test.x.shape == (6, 3, 64, 64)
    assert train.class_counts().tolist() == [2, 2, 2] and test.class_counts().tolist() == [2, 2, 2]
    # classes by sorted wnid; the fixture lists them descending and leaves the last unnamed
    assert train.class_names == ("n08998000", "thing9000", "thing0000")
    info = dataset_info(cfg)
    assert info.class_names == train.class_names and info.num_classes == 3


def test_tiny_imagenet_size_mismatch(tmp_path: Path) -> None:
    from PIL import Image

    base = write_tiny_imagenet(tmp_path, n_classes=2, n_train=1, n_val=1)
    Image.new("RGB", (32, 32)).save(base / "val" / "images" / "val_1.JPEG", "JPEG")
    with pytest.raises(DataError, match="val_1.JPEG.*differs"):
        load_split(DataConfig(name="tiny-imagenet", root=str(tmp_path)), "test")


def test_tiny_imagenet_missing(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="Tiny-ImageNet not found.*data.download: true"):
        load_split(DataConfig(name="tiny-imagenet", root=str(tmp_path)), "train")


# --------------------------------------------------------------------------------------------
# synthetic


SYN = DataConfig(
    name="synthetic",
    synthetic=SyntheticDataConfig(num_classes=5, channels=3, image_size=12, train_per_class=8, test_per_class=4),
)


def test_synthetic_shapes_balance_determinism() -> None:
    train, test = load_split(SYN, "train"), load_split(SYN, "test")
    assert train.x.shape == (40, 3, 12, 12) and test.x.shape == (20, 3, 12, 12)
    assert train.x.dtype == torch.uint8 and train.y.dtype == torch.int64
    assert train.class_counts().tolist() == [8] * 5 and test.class_counts().tolist() == [4] * 5
    assert train.class_names == ("class0", "class1", "class2", "class3", "class4")
    again = load_split(SYN, "train")
    assert torch.equal(train.x, again.x) and torch.equal(train.y, again.y)
    # train and test draw different noise: no test image repeats a train image
    flat_train = train.x.flatten(1)
    assert not any(bool((flat_train == row).all(1).any()) for row in test.x.flatten(1))


def test_synthetic_prototype_of_a_class_does_not_depend_on_num_classes() -> None:
    small = load_split(DataConfig(name="synthetic", synthetic=SyntheticDataConfig(num_classes=2)), "test")
    big = load_split(DataConfig(name="synthetic", synthetic=SyntheticDataConfig(num_classes=6)), "test")
    for k in range(2):
        a = small.images()[small.y == k].mean(0)
        b = big.images()[big.y == k].mean(0)
        assert (a - b).abs().mean() < 0.1


def test_synthetic_is_learnable_by_nearest_class_mean() -> None:
    cfg = DataConfig(name="synthetic")
    train, test = load_split(cfg, "train"), load_split(cfg, "test")
    means = torch.stack([train.images()[train.y == k].mean(0) for k in range(train.num_classes)])
    # tolerant to the one-pixel shifts: blur a little before comparing
    blur = torch.nn.AvgPool2d(3, stride=1, padding=1)
    d = torch.cdist(blur(test.images()).flatten(1), blur(means).flatten(1))
    assert (d.argmin(1) == test.y).float().mean() > 0.9


# --------------------------------------------------------------------------------------------
# ImageSet, class_balanced_subset


def test_imageset_validation() -> None:
    x = torch.zeros(3, 1, 2, 2, dtype=torch.uint8)
    with pytest.raises(ValueError, match="uint8"):
        ImageSet(x.float(), torch.zeros(3, dtype=torch.long), ("a",))
    with pytest.raises(ValueError, match="int64"):
        ImageSet(x, torch.zeros(3, dtype=torch.int32), ("a",))
    with pytest.raises(ValueError, match="3 images but 2 labels"):
        ImageSet(x, torch.zeros(2, dtype=torch.long), ("a",))
    with pytest.raises(ValueError, match="labels must lie"):
        ImageSet(x, torch.tensor([0, 1, 2]), ("a", "b"))
    s = ImageSet(x, torch.tensor([0, 1, 1]), ("a", "b"))
    assert len(s) == 3 and s.num_classes == 2 and s.image_shape == (1, 2, 2)
    assert s.class_counts().tolist() == [1, 2]


def test_images_and_subset_indexing() -> None:
    s = small_set()
    idx = torch.tensor([5, 0, 7])
    assert torch.equal(s.images(idx), s.x[idx].float() / 255)
    assert torch.equal(s.images(slice(2, 4)), s.x[2:4].float() / 255)
    assert torch.equal(s.images([1, 2]), s.x[[1, 2]].float() / 255)
    sub = s.subset(idx)
    assert torch.equal(sub.y, s.y[idx]) and sub.class_names == s.class_names
    assert s.images().dtype == torch.float32 and s.x.dtype == torch.uint8  # original untouched


def indexed_set(n: int, k: int = 3) -> ImageSet:
    """Image i is filled with the value i, so a batch tells which indices it holds."""
    x = torch.arange(n, dtype=torch.uint8).view(n, 1, 1, 1).expand(n, 1, 2, 2).contiguous()
    return ImageSet(x, torch.arange(n) % k, tuple(f"c{i}" for i in range(k)))


def batch_indices(s: ImageSet, batch_size: int, **kw) -> list[list[int]]:
    out = []
    for xb, yb in s.batches(batch_size, **kw):
        assert xb.dtype == torch.float32 and yb.dtype == torch.int64 and len(xb) == len(yb) <= batch_size
        idx = (xb[:, 0, 0, 0] * 255).round().long()
        assert torch.equal(yb, idx % s.num_classes)  # labels travel with their images
        out.append(idx.tolist())
    return out


def test_batches_cover_every_index_once() -> None:
    s = indexed_set(23)
    shuffled = batch_indices(s, 5, shuffle=True, generator=torch.Generator().manual_seed(3))
    assert [len(b) for b in shuffled] == [5, 5, 5, 5, 3]
    flat = [i for b in shuffled for i in b]
    assert sorted(flat) == list(range(23)) and flat != list(range(23))
    assert batch_indices(s, 10) == [list(range(10)), list(range(10, 20)), [20, 21, 22]]


def test_batches_reproducible_with_seeded_generator() -> None:
    s = indexed_set(30)

    def order(seed: int) -> list[list[int]]:
        return batch_indices(s, 7, shuffle=True, generator=torch.Generator().manual_seed(seed))

    assert order(0) == order(0)
    assert order(0) != order(1)
    with pytest.raises(ValueError):
        next(s.batches(0))


def test_class_balanced_subset() -> None:
    s = small_set(30, k=3)  # 10 per class
    a = class_balanced_subset(s, 4, seed=7)
    b = class_balanced_subset(s, 4, seed=7)
    c = class_balanced_subset(s, 4, seed=8)
    assert a.class_counts().tolist() == [4, 4, 4]
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert not torch.equal(a.x, c.x)
    # order is the original order: recover the indices and check they are increasing
    rows = [int(((s.x == img).flatten(1).all(1)).nonzero()[0]) for img in a.x]
    assert rows == sorted(rows)
    # a cap larger than a class takes the whole class
    assert class_balanced_subset(s, 100, seed=0).class_counts().tolist() == [10, 10, 10]


# --------------------------------------------------------------------------------------------
# dataset_info


@pytest.mark.parametrize(
    ("name", "k", "shape", "eps"),
    [
        ("fashion-mnist", 10, (1, 28, 28), 0.1),
        ("cifar10", 10, (3, 32, 32), 8 / 255),
        ("cifar100", 100, (3, 32, 32), 8 / 255),
        ("tiny-imagenet", 200, (3, 64, 64), 8 / 255),
        ("synthetic", 4, (1, 16, 16), 0.1),
    ],
)
def test_dataset_info(tmp_path: Path, name: str, k: int, shape: tuple[int, int, int], eps: float) -> None:
    info = dataset_info(DataConfig(name=name, root=str(tmp_path)))
    assert info.name == name and info.num_classes == k and info.image_shape == shape
    assert len(info.class_names) == k == len(set(info.class_names))
    assert info.default_eps == pytest.approx(eps)
    assert len(info.mean) == len(info.std) == shape[0]
    assert all(0 < m < 1 for m in info.mean) and all(0 < s < 1 for s in info.std)


def test_dataset_info_class_names() -> None:
    assert dataset_info(DataConfig(name="fashion-mnist")).class_names[-1] == "Ankle boot"
    assert dataset_info(DataConfig(name="cifar10")).class_names[0] == "airplane"
    assert dataset_info(DataConfig(name="cifar100")).class_names[-1] == "worm"
