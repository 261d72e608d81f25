"""ferd fetch-data: the dataset as a DVC output, from a named folder or archive, Debian, or a download.

Every case checks what the output folder holds (and that loading reads it), that the checksums
are enforced unless switched off, and that a failure leaves neither an output nor a temp folder.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
import zipfile
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import ferd.data as data_mod
from ferd.config import DataConfig, SyntheticDataConfig
from ferd.data import (
    FASHION_MNIST_IDX_MD5,
    FETCH_MANIFEST,
    SYSTEM_FASHION_MNIST_DIRS,
    dataset_dir,
    fetch_dataset,
    find_fashion_mnist,
    load_split,
)
from ferd.errors import DataError
from tests.conftest import tiny_params, write_params
from tests.fixtures import write_cifar10_batches, write_cifar100_python, write_fashion_mnist_idx, write_tiny_imagenet

FMNIST_FILES = sorted(FASHION_MNIST_IDX_MD5)


@pytest.fixture(autouse=True)
def no_system_fmnist(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hide Debian's Fashion-MNIST (tests that want it restore it themselves)."""
    monkeypatch.setattr(data_mod, "SYSTEM_FASHION_MNIST_DIRS", ())


def _tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name.startswith(".")) if root.is_dir() else []


# --------------------------------------------------------------------------------------------
# Fashion-MNIST


def test_fashion_mnist_from_a_folder_gz_or_not_gives_the_same_bytes(tmp_path: Path) -> None:
    gz = write_fashion_mnist_idx(tmp_path / "src-gz", n_train=30, n_test=10, compress=True)
    plain = write_fashion_mnist_idx(tmp_path / "src-plain" / "FashionMNIST" / "raw", n_train=30, n_test=10, compress=False)
    outs = []
    for i, src in enumerate((gz, plain.parents[1])):  # the folder itself, or torchvision's layout inside it
        cfg = DataConfig(name="fashion-mnist", root=str(tmp_path / f"root{i}"), source=str(src), verify_checksums=False)
        result = fetch_dataset(cfg)
        out = dataset_dir(cfg)
        assert result.path == out == tmp_path / f"root{i}" / "fashion-mnist"
        assert sorted(_tree(out)) == sorted([*FMNIST_FILES, FETCH_MANIFEST])  # decompressed, nothing else
        assert result.files == 4 and result.checked.startswith("not checked")
        assert find_fashion_mnist(cfg.root) == out
        test = load_split(cfg, "test")
        assert test.x.shape == (10, 1, 28, 28) and torch.equal(test.y, torch.arange(10) % 10)
        outs.append(_tree(out))
        assert _leftovers(tmp_path / f"root{i}") == []
    assert outs[0] == outs[1], "the same data must give the same output bytes (and DVC hash) whatever its packing"
    manifest = json.loads(outs[0][FETCH_MANIFEST])
    assert manifest == {"dataset": "fashion-mnist", "files": 4, "bytes": sum(len(v) for k, v in outs[0].items()
                                                                           if k != FETCH_MANIFEST), "format_version": 1}


def test_fashion_mnist_checksums_are_enforced(tmp_path: Path) -> None:
    src = write_fashion_mnist_idx(tmp_path / "src")
    cfg = DataConfig(name="fashion-mnist", root=str(tmp_path / "raw"), source=str(src))
    with pytest.raises(DataError, match=r"md5 .*published Fashion-MNIST.*data.verify_checksums: false"):
        fetch_dataset(cfg)
    assert not dataset_dir(cfg).exists() and _leftovers(tmp_path / "raw") == []


def test_fashion_mnist_corrupt_file_fails_even_unchecked(tmp_path: Path) -> None:
    src = write_fashion_mnist_idx(tmp_path / "src", compress=False)
    (src / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x03" + b"\x00" * 10)
    cfg = DataConfig(name="fashion-mnist", root=str(tmp_path / "raw"), source=str(src), verify_checksums=False)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.*magic"):
        fetch_dataset(cfg)
    assert not dataset_dir(cfg).exists() and _leftovers(tmp_path / "raw") == []


def test_nothing_found_says_what_to_set(tmp_path: Path) -> None:
    cfg = DataConfig(name="fashion-mnist", root=str(tmp_path / "raw"))
    with pytest.raises(DataError, match="Fashion-MNIST not found in") as err:
        fetch_dataset(cfg)
    for hint in ("dataset-fashion-mnist", "data.source", "data.download: true", str(tmp_path / "raw")):
        assert hint in str(err.value)
    with pytest.raises(DataError, match="data.source: .*does not exist"):
        fetch_dataset(DataConfig(name="cifar10", root=str(tmp_path / "raw"), source=str(tmp_path / "nope")))
    with pytest.raises(DataError, match="data.source: 'some/folder' is a relative path"):
        fetch_dataset(DataConfig(name="fashion-mnist", root=str(tmp_path / "raw"), source="some/folder"))
    with pytest.raises(DataError, match="data.source: no Fashion-MNIST IDX files"):
        fetch_dataset(DataConfig(name="fashion-mnist", root=str(tmp_path / "raw"), source=str(tmp_path)))
    assert not (tmp_path / "raw" / "fashion-mnist").exists() and _leftovers(tmp_path / "raw") == []


def test_output_replaces_what_was_there_and_stale_temps_go(tmp_path: Path) -> None:
    src = write_fashion_mnist_idx(tmp_path / "src", n_train=10, n_test=10)
    cfg = DataConfig(name="fashion-mnist", root=str(tmp_path / "raw"), source=str(src), verify_checksums=False)
    out = dataset_dir(cfg)
    out.mkdir(parents=True)
    (out / "junk.txt").write_text("left from before")
    stale = tmp_path / "raw" / ".fashion-mnist.999999999.abc.tmp"  # a SIGKILLed writer's folder (no such pid)
    stale.mkdir()
    (stale / "half").write_text("x")
    fetch_dataset(cfg)
    assert not (out / "junk.txt").exists() and (out / FETCH_MANIFEST).is_file()
    assert _leftovers(tmp_path / "raw") == []


@pytest.mark.skipif(not any(find_fashion_mnist(p) == p for p in SYSTEM_FASHION_MNIST_DIRS),
                    reason="Debian's dataset-fashion-mnist is not installed (/usr/share/datasets/fashion-mnist)")
def test_fashion_mnist_from_debian_matches_the_published_content(tmp_path: Path, monkeypatch) -> None:
    """Debian recompressed the .gz files (other md5s than Zalando's), but their content is the published one."""
    monkeypatch.setattr(data_mod, "SYSTEM_FASHION_MNIST_DIRS", SYSTEM_FASHION_MNIST_DIRS)
    cfg = DataConfig(name="fashion-mnist", root=str(tmp_path / "raw"))
    result = fetch_dataset(cfg)
    assert result.checked == "content md5s verified" and str(SYSTEM_FASHION_MNIST_DIRS[0]) in result.source
    for name, md5 in FASHION_MNIST_IDX_MD5.items():
        assert hashlib.md5((dataset_dir(cfg) / name).read_bytes()).hexdigest() == md5
    assert result.bytes == 47040016 + 60008 + 7840016 + 10008


def test_fashion_mnist_download_goes_through_torchvision(tmp_path: Path, monkeypatch) -> None:
    """data.download: torchvision's FashionMNIST fetches (and md5-checks) the files; offline here, so it is stubbed."""
    import torchvision.datasets

    calls = []

    class FakeFashionMNIST:
        mirrors = ["http://example.invalid/"]

        def __init__(self, root: str, train: bool, download: bool) -> None:
            calls.append(download)
            write_fashion_mnist_idx(Path(root) / "FashionMNIST" / "raw", n_train=10, n_test=10)

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", FakeFashionMNIST)
    cfg = DataConfig(name="fashion-mnist", root=str(tmp_path / "raw"), download=True, verify_checksums=False)
    result = fetch_dataset(cfg)
    assert calls == [True] and "example.invalid" in result.source
    assert sorted(_tree(dataset_dir(cfg))) == sorted([*FMNIST_FILES, FETCH_MANIFEST]), "the download folder is gone"
    assert len(load_split(cfg, "train")) == 10

    class Offline(FakeFashionMNIST):
        def __init__(self, root: str, train: bool, download: bool) -> None:
            raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    monkeypatch.setattr(torchvision.datasets, "FashionMNIST", Offline)
    cfg = DataConfig(name="fashion-mnist", root=str(tmp_path / "raw2"), download=True)
    with pytest.raises(DataError, match="download failed.*check the network"):
        fetch_dataset(cfg)
    assert not dataset_dir(cfg).exists() and _leftovers(tmp_path / "raw2") == []


# --------------------------------------------------------------------------------------------
# CIFAR


def _tar_gz(folder: Path, archive: Path) -> Path:
    with tarfile.open(archive, "w:gz") as t:
        t.add(folder, arcname=folder.name)
    return archive


@pytest.mark.parametrize(("name", "writer"), [("cifar10", write_cifar10_batches), ("cifar100", write_cifar100_python)])
def test_cifar_from_a_folder_loads_like_the_original(tmp_path: Path, name: str, writer) -> None:
    folder = writer(tmp_path / "src")
    (folder / "readme.html").write_text("not part of the dataset")
    cfg = DataConfig(name=name, root=str(tmp_path / "raw"), source=str(tmp_path / "src"), verify_checksums=False)
    fetch_dataset(cfg)
    out = dataset_dir(cfg) / folder.name
    assert sorted(_tree(out)) == sorted(p.name for p in folder.iterdir() if p.name != "readme.html")
    original = load_split(DataConfig(name=name, root=str(tmp_path / "src"), verify_checksums=False), "train")
    fetched = load_split(cfg, "train")
    assert torch.equal(original.x, fetched.x) and torch.equal(original.y, fetched.y)
    with pytest.raises(DataError, match="md5 .*published"):  # the fixture is not the real CIFAR
        fetch_dataset(DataConfig(name=name, root=str(tmp_path / "raw3"), source=str(folder)))
    assert not (tmp_path / "raw3" / name).exists()


def test_cifar_from_an_archive_and_from_the_old_place_under_root(tmp_path: Path) -> None:
    folder = write_cifar10_batches(tmp_path / "src")
    archive = _tar_gz(folder, tmp_path / "cifar-10-python.tar.gz")
    by_archive = DataConfig(name="cifar10", root=str(tmp_path / "a"), source=str(archive), verify_checksums=False)
    fetch_dataset(by_archive)
    legacy_root = folder.parent  # <root>/cifar-10-batches-py, where the loader used to look
    by_legacy = DataConfig(name="cifar10", root=str(legacy_root), verify_checksums=False)
    result = fetch_dataset(by_legacy)
    assert result.source == str(folder)
    assert _tree(dataset_dir(by_archive)) == _tree(dataset_dir(by_legacy))
    with pytest.raises(DataError, match="md5 .*published"):
        fetch_dataset(DataConfig(name="cifar10", root=str(tmp_path / "b"), source=str(archive)))
    assert not (tmp_path / "b" / "cifar10").exists()


def test_cifar_download_checks_and_unpacks_the_archive(tmp_path: Path, monkeypatch) -> None:
    import torchvision.datasets.utils as tv_utils

    archive = _tar_gz(write_cifar10_batches(tmp_path / "served"), tmp_path / "served.tar.gz")
    seen = []

    def fake_download_url(url: str, root: str, filename: str | None = None, md5: str | None = None) -> None:
        seen.append((url, filename, md5))
        Path(root).mkdir(parents=True, exist_ok=True)
        (Path(root) / filename).write_bytes(archive.read_bytes())

    monkeypatch.setattr(tv_utils, "download_url", fake_download_url)
    cfg = DataConfig(name="cifar10", root=str(tmp_path / "raw"), download=True, verify_checksums=False)
    result = fetch_dataset(cfg)
    assert seen == [("https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz", "cifar-10-python.tar.gz", None)]
    assert result.source.startswith("a download from") and len(load_split(cfg, "test")) == 10
    assert sorted(p.name for p in dataset_dir(cfg).iterdir()) == ["cifar-10-batches-py", FETCH_MANIFEST]
    with pytest.raises(DataError, match="CIFAR-10 not found in .*data.download: true"):
        fetch_dataset(DataConfig(name="cifar10", root=str(tmp_path / "none")))


# --------------------------------------------------------------------------------------------
# Tiny-ImageNet, synthetic


def test_tiny_imagenet_from_folder_and_zip(tmp_path: Path) -> None:
    base = write_tiny_imagenet(tmp_path / "src", n_classes=3, n_train=2, n_val=2, size=64)
    (base / "test" / "images").mkdir(parents=True)
    (base / "test" / "images" / "test_0.JPEG").write_bytes((base / "val" / "images" / "val_0.JPEG").read_bytes())
    by_folder = DataConfig(name="tiny-imagenet", root=str(tmp_path / "a"), source=str(tmp_path / "src"),
                           verify_checksums=False)
    fetch_dataset(by_folder)
    out = dataset_dir(by_folder) / "tiny-imagenet-200"
    assert not (out / "test").exists() and not list(out.glob("train/*/*_boxes.txt")), "only what loading reads"
    original = load_split(DataConfig(name="tiny-imagenet", root=str(tmp_path / "src")), "train")
    fetched = load_split(by_folder, "train")
    assert torch.equal(original.x, fetched.x) and original.class_names == fetched.class_names
    archive = tmp_path / "tiny-imagenet-200.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for p in sorted(base.rglob("*")):
            z.write(p, p.relative_to(base.parent))
    by_zip = DataConfig(name="tiny-imagenet", root=str(tmp_path / "b"), source=str(archive), verify_checksums=False)
    fetch_dataset(by_zip)
    assert _tree(dataset_dir(by_zip)) == _tree(dataset_dir(by_folder))
    with pytest.raises(DataError, match="3 classes.*expected 200"):  # counts are checked when checksums are on
        fetch_dataset(DataConfig(name="tiny-imagenet", root=str(tmp_path / "c"), source=str(tmp_path / "src")))
    with pytest.raises(DataError, match="md5"):
        fetch_dataset(DataConfig(name="tiny-imagenet", root=str(tmp_path / "c"), source=str(archive)))
    assert not (tmp_path / "c" / "tiny-imagenet").exists()


def test_synthetic_writes_a_manifest_of_its_params(tmp_path: Path) -> None:
    syn = SyntheticDataConfig(num_classes=3, image_size=8)
    cfg = DataConfig(name="synthetic", root=str(tmp_path / "raw"), synthetic=syn)
    result = fetch_dataset(cfg)
    first = _tree(dataset_dir(cfg))
    assert list(first) == [FETCH_MANIFEST] and result.files == 0
    assert json.loads(first[FETCH_MANIFEST])["synthetic"]["num_classes"] == 3
    fetch_dataset(cfg)
    assert _tree(dataset_dir(cfg)) == first, "byte-stable"
    other = DataConfig(name="synthetic", root=str(tmp_path / "raw"), synthetic=SyntheticDataConfig(num_classes=4))
    fetch_dataset(other)
    assert _tree(dataset_dir(other)) != first, "other synthetic params, other output (so DVC reruns what reads it)"


# --------------------------------------------------------------------------------------------
# the command


def test_command_writes_the_output_or_one_error_line(tmp_path: Path, monkeypatch) -> None:
    from stages.cli import app

    monkeypatch.chdir(tmp_path)
    write_params(tmp_path / "params.yaml", tiny_params())
    result = CliRunner().invoke(app, ["fetch-data"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "data" / "raw" / "synthetic" / FETCH_MANIFEST).is_file()
    write_params(tmp_path / "params.yaml", tiny_params(data={"name": "fashion-mnist", "root": "data/raw"}))
    result = CliRunner().invoke(app, ["fetch-data"])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Fashion-MNIST not found" in errors[0] and "Traceback" not in result.output
    assert not (tmp_path / "data" / "raw" / "fashion-mnist").exists()
