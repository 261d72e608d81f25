"""Shared test set-up: tiny params, a tiny trained teacher artifact, git identity for DVC tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]

# DVC/git in temporary repos need an identity; CI machines may have none configured.
for key, value in {
    "GIT_AUTHOR_NAME": "ferd-tests", "GIT_AUTHOR_EMAIL": "tests@ferd.invalid",
    "GIT_COMMITTER_NAME": "ferd-tests", "GIT_COMMITTER_EMAIL": "tests@ferd.invalid",
}.items():
    os.environ.setdefault(key, value)


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tests use tiny tensors: one intra-op thread is faster and avoids OpenMP stalls on a busy 2-core box."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_params(**sections: dict) -> dict:
    """A params mapping for the synthetic 4-class 1x16x16 dataset and a width-4 CNN teacher."""
    params = {
        "seed": 0,
        "runtime": {"device": "cpu", "threads": 1},
        "data": {
            "name": "synthetic", "root": "data/raw", "eps": 0.1,
            "synthetic": {"num_classes": 4, "channels": 1, "image_size": 16, "train_per_class": 48, "test_per_class": 12},
        },
        "teacher": {
            "source": "train", "arch": "cnn", "width": 4,
            "train": {"epochs": 2, "batch_size": 32, "lr": 0.05, "attack_steps": 1, "attack_step_size": 1.0},
            "eval_subset": 0, "eval_pgd_steps": 3,
        },
        "probe": {"per_class": 4, "steps": 3, "real_split": "test", "real_per_class": 4},
        "reweight": {"method": "softmax", "signal": "teacher", "tau": 1.0},
        "fae": {
            "epochs": 4, "warmup": 1, "batch_size": 16, "steps": 3, "nz": 16, "ngf": 8, "ib_steps": 2,
            "augment_pad": 1, "shadow_width": 4, "shadow_steps": 2,
        },
        "utae": {"gamma": 0.3, "steps": 2},
        "distill": {
            "schedule": "staged", "arch": "cnn", "width": 4, "steps": 3, "batch_size": 16,
            "augment_pad": 1,
        },
        "evaluate": {
            "batch_size": 64, "pgd_steps": 3, "cw_steps": 3, "autoattack": "fast", "autoattack_per_class": 2,
            "eps_sweep": [0.5, 1.0],
        },
    }
    for name, values in sections.items():
        if isinstance(values, dict) and isinstance(params.get(name), dict):
            params[name] = {**params[name], **values}
        else:
            params[name] = values
    return params


def write_params(path: Path, params: dict) -> Path:
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture
def tiny_params_file(tmp_path: Path) -> Path:
    return write_params(tmp_path / "params.yaml", tiny_params())


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory) -> Path:
    """A teacher artifact trained on the synthetic data by `ferd fetch-teacher` (once per session)."""
    from typer.testing import CliRunner

    from stages.cli import app

    folder = tmp_path_factory.mktemp("teacher")
    params = write_params(folder / "params.yaml", tiny_params())
    out = folder / "teacher.safetensors"
    result = CliRunner().invoke(app, ["--params", str(params), "fetch-teacher", "--out", str(out)])
    assert result.exit_code == 0, result.output
    return out


def load_benchmark(name: str):
    """A script of benchmarks/ imported as a module (they are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
