"""benchmarks/pool_diversity.py: the per-class distance is the mean over ordered pairs, and the
script reads a real pool artifact."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ferd.artifacts import save_h5
from tests.conftest import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("pool_diversity")


def test_class_distances_by_hand(bench):
    # class 0: three 1x1x2 images at (0,0), (3,4), (0,0): pairwise distances 5, 0, 5 -> mean 10/3
    x = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0], [1.0, 1.0]]).reshape(4, 1, 1, 2)
    y = torch.tensor([0, 0, 0, 1])
    d = bench.class_distances(x, y, 3)
    assert d[0] == pytest.approx(10.0 / 3.0)
    assert math.isnan(d[1]) and math.isnan(d[2])  # fewer than two images


def test_main_reads_a_pool(bench, tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.random((12, 1, 4, 4), dtype=np.float32)
    y = np.repeat(np.arange(3), 4).astype(np.int64)
    x[y == 1] = 0.5  # a collapsed class: every image the same
    path = tmp_path / "pool.h5"
    save_h5(path, kind="pool", arrays={"x": x, "y": y}, attrs={"class_names": ["a", "b", "c"]})
    bench.main([str(path), "--real-per-class", "0"])
    out = capsys.readouterr().out
    row = next(line for line in out.splitlines() if "pool.h5" in line).split()
    assert row[1] == "12" and float(row[3]) == 0.0 and float(row[2]) > 0.5
