"""The FERD stages through the CLI with dvc.yaml's default paths, on the tiny synthetic setting."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from ferd.artifacts import load_h5, load_model
from stages.cli import app
from tests.conftest import tiny_params, write_params

runner = CliRunner()
CHAIN = ("fetch-teacher", "probe", "reweight", "synth-fae", "gen-utae", "distill")
OUTPUTS = ("data/teacher/teacher.safetensors", "data/probe/probe.h5", "data/reweight/class_weights.json",
           "data/fae/pool.h5", "data/utae/utae.h5", "data/student/student.safetensors")


def run_chain(root: Path, params: dict) -> None:
    """Every stage alone, in order, from ``root`` as the working directory, with default paths."""
    root.mkdir(parents=True, exist_ok=True)
    write_params(root / "params.yaml", params)
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for stage in CHAIN:
            result = runner.invoke(app, [stage])
            assert result.exit_code == 0, f"{stage}:\n{result.output}"
        result = runner.invoke(app, ["evaluate", "--name", "student"])
        assert result.exit_code == 0, result.output
    finally:
        os.chdir(cwd)


@pytest.fixture(scope="module")
def staged(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("staged")
    run_chain(root, tiny_params())
    return root


def test_every_stage_writes_its_artifact(staged):
    for out in OUTPUTS:
        assert (staged / out).is_file(), out
    for metric in ("synthesis.csv", "utae_targets.csv", "distill.csv", "student.json", "student_per_class.csv"):
        assert (staged / "metrics" / metric).is_file(), metric


def test_probe_records_margins_and_fragility(staged):
    arrays, attrs = load_h5(staged / "data/probe/probe.h5", kind="probe")
    assert arrays["x"].shape == (16, 1, 16, 16) and np.bincount(arrays["y"]).tolist() == [4, 4, 4, 4]
    assert arrays["D"].shape == (4,) and arrays["real_D"].shape == (4,)
    # D is the class mean of -margin
    for c in range(4):
        assert arrays["D"][c] == pytest.approx(-arrays["margins"][arrays["y"] == c].mean(), abs=1e-5)
    assert -1.0 <= attrs["rank_correlation"] <= 1.0


def test_reweight_json(staged):
    weights = json.loads((staged / "data/reweight/class_weights.json").read_text())
    assert weights["classes"] == ["class0", "class1", "class2", "class3"] and weights["method"] == "softmax"
    assert sum(weights["p"]) == pytest.approx(1.0)
    order_d = np.argsort(weights["D"])
    assert np.all(np.diff(np.asarray(weights["p"])[order_d]) >= 0), "more fragile classes must get more weight"


def test_pool_grows_as_specified(staged):
    arrays, attrs = load_h5(staged / "data/fae/pool.h5", kind="pool")
    epochs, batch = 4, 16
    assert arrays["x"].shape == (epochs * batch, 1, 16, 16)
    assert arrays["x"].min() >= 0 and arrays["x"].max() <= 1
    assert np.bincount(arrays["epoch"]).tolist() == [0] + [batch] * epochs
    assert arrays["p_history"].shape == (epochs, 4)
    first = json.loads((staged / "data/reweight/class_weights.json").read_text())["p"]
    np.testing.assert_allclose(arrays["p_history"][0], first, atol=1e-7)  # epoch 1 samples from reweight's p
    assert attrs["schedule"] == "staged"


def test_utae_histograms(staged):
    arrays, attrs = load_h5(staged / "data/utae/utae.h5", kind="utae")
    assert arrays["delta"].shape == (64, 1, 16, 16) and np.abs(arrays["delta"]).max() <= 0.1 + 1e-6
    assert arrays["hist"].shape == (4,) and attrs["gamma"] == pytest.approx(0.3)


def test_distill_log_and_student(staged):
    model, meta = load_model(staged / "data/student/student.safetensors", produced_by="distill")
    assert meta["arch"] == "cnn" and meta["width"] == 4 and meta["source"] == "distill"
    from ferd.distill import LOG_COLUMNS

    with open(staged / "metrics/distill.csv", newline="") as fh:
        reader = csv.DictReader(fh)
        rows = list(reader)
    assert tuple(reader.fieldnames[:len(LOG_COLUMNS)]) == LOG_COLUMNS and "p_class0" in reader.fieldnames
    assert [int(r["epoch"]) for r in rows] == [2, 3, 4]  # warm-up 1, E = 4
    assert all(float(r["loss_boundary"]) == 0.0 for r in rows)  # distill.boundary: none
    sizes = [int(r["pool_size"]) for r in rows]
    assert sizes == sorted(sizes) and sizes[0] < sizes[-1], "epoch k sees the pool up to warm-up + k"


def test_same_seed_same_artifacts(staged, tmp_path):
    run_chain(tmp_path / "again", tiny_params())
    for out in OUTPUTS:
        assert (staged / out).read_bytes() == (tmp_path / "again" / out).read_bytes(), out
    for metric in sorted((staged / "metrics").iterdir()):  # logs, histograms, evaluation: every byte
        assert metric.read_bytes() == (tmp_path / "again/metrics" / metric.name).read_bytes(), metric.name


def test_interleaved_schedule(tmp_path):
    base = tiny_params()
    params = tiny_params(distill={**base["distill"], "schedule": "interleaved"})
    run_chain(tmp_path, params)
    arrays, attrs = load_h5(tmp_path / "data/fae/pool.h5", kind="pool")
    assert attrs["schedule"] == "interleaved" and len(arrays["y"]) == 16  # only the warm-up epoch
    with open(tmp_path / "metrics/distill.csv", newline="") as fh:
        sizes = [int(r["pool_size"]) for r in csv.DictReader(fh)]
    # pool_size counts the training images (the whole pool: the holdout is the probe set): one batch more per epoch
    assert sizes == [32, 48, 64], sizes


def test_schedule_mismatch_is_refused(staged, tmp_path, monkeypatch):
    base = tiny_params()
    params = write_params(tmp_path / "p.yaml", tiny_params(distill={**base["distill"], "schedule": "interleaved"}))
    monkeypatch.chdir(staged)
    result = runner.invoke(app, ["--params", str(params), "distill", "--out", str(tmp_path / "s.safetensors")])
    assert result.exit_code == 1 and "rerun `ferd synth-fae`" in result.output
    assert not (tmp_path / "s.safetensors").exists()


def test_missing_upstream_artifact(tmp_path, monkeypatch):
    write_params(tmp_path / "params.yaml", tiny_params())
    monkeypatch.chdir(tmp_path)
    result = runner.invoke(app, ["reweight"])
    assert result.exit_code == 1 and "run `ferd probe`" in result.output


def test_cached_utae_init(staged, tmp_path, monkeypatch):
    base = tiny_params()
    params = write_params(tmp_path / "p.yaml", tiny_params(distill={**base["distill"], "utae_init": "cached"}))
    monkeypatch.chdir(staged)
    out = tmp_path / "cached.safetensors"
    result = runner.invoke(app, ["--params", str(params), "distill", "--out", str(out), "--log", str(tmp_path / "d.csv")])
    assert result.exit_code == 0, result.output
    assert out.is_file()


def test_report_adds_class_weights_and_fae_grid(staged, monkeypatch):
    monkeypatch.chdir(staged)
    metrics = staged / "metrics"
    (metrics / "teacher.json").write_bytes((metrics / "student.json").read_bytes())  # the report wants >= 1 model
    (metrics / "teacher_per_class.csv").write_bytes((metrics / "student_per_class.csv").read_bytes())
    result = runner.invoke(app, ["report"])
    assert result.exit_code == 0, result.output
    for name in ("per_class.png", "summary.md", "class_weights.png", "fae_samples.png"):
        assert (staged / "reports" / name).read_bytes()[:4] in (b"\x89PNG", b"# fe"), name
