"""dvc.yaml: each stage declares exactly the params it reads; `dvc repro` reruns exactly what changed."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from stages.cli import STAGE_MODULES
from tests.conftest import REPO, tiny_params, write_params


def _dvc_stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_every_stage_declares_exactly_its_sections():
    stages = _dvc_stages()
    assert set(stages) == set(STAGE_MODULES)
    for name, stage in stages.items():
        stage = stage.get("do", stage)  # foreach stages
        declared = stage.get("params", [])
        assert declared == list(STAGE_MODULES[name].SECTIONS), name
        assert "runtime" not in declared
        assert stage["cmd"].startswith(f"ferd {name}")


def test_undeclared_section_read_fails():
    from ferd.config import params_from_mapping
    from stages._ui import DeclaredParams

    params = DeclaredParams(params_from_mapping({}), ("seed", "teacher"))
    assert params.teacher.arch == "cnn" and params.runtime.device == "auto"
    with pytest.raises(RuntimeError, match="without declaring"):
        _ = params.evaluate


def _run(cmd: list[str], cwd: Path) -> str:
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout + proc.stderr


def _dvc(cwd: Path, *args: str) -> str:
    return _run([sys.executable, "-m", "dvc", *args], cwd)


@pytest.fixture
def dvc_repo(tmp_path: Path) -> Path:
    """A throw-away git+DVC repo with this project's dvc.yaml, code and a tiny params file."""
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    for pkg in ("ferd", "stages"):
        shutil.copytree(REPO / pkg, repo / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    write_params(repo / "params.yaml", tiny_params())
    _run(["git", "init", "-q"], repo)
    _dvc(repo, "init", "-q")
    _dvc(repo, "config", "core.analytics", "false")
    return repo


def _ran(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")}


ALL = {"fetch-data", "fetch-teacher", "probe", "reweight", "synth-fae", "gen-utae", "distill", "evaluate@teacher",
       "evaluate@student"}


@pytest.mark.slow
def test_dvc_repro_reruns_only_what_changed(dvc_repo: Path):
    assert _ran(_dvc(dvc_repo, "repro")) == ALL
    assert (dvc_repo / "data" / "student" / "student.safetensors").is_file()
    assert (dvc_repo / "data" / "raw" / "synthetic" / "fetched.json").is_file()  # fetch-data's output, even for synthetic
    assert _ran(_dvc(dvc_repo, "repro")) == set(), "nothing changed: nothing runs"

    params = tiny_params(runtime={"device": "cpu", "threads": 2})  # speed only: not a dependency
    write_params(dvc_repo / "params.yaml", params)
    assert _ran(_dvc(dvc_repo, "repro")) == set()

    def change(section: str, key: str, value) -> set[str]:
        params[section][key] = value
        write_params(dvc_repo / "params.yaml", params)
        return _ran(_dvc(dvc_repo, "repro"))

    assert change("distill", "steps", 2) == {"distill", "evaluate@student"}
    assert change("utae", "gamma", 0.5) == {"gen-utae", "distill", "evaluate@student"}
    assert change("reweight", "tau", 2.0) == {"reweight", "synth-fae", "gen-utae", "distill", "evaluate@student"}
    assert change("evaluate", "pgd_steps", 2) == {"evaluate@teacher", "evaluate@student"}
    metrics = _dvc(dvc_repo, "metrics", "show")
    assert "student.json" in metrics and "pgd_worst" in metrics


@pytest.mark.slow
def test_failed_stage_is_not_recorded(dvc_repo: Path):
    _dvc(dvc_repo, "repro")
    lock = (dvc_repo / "dvc.lock").read_text()
    params = tiny_params()
    params["teacher"]["source"] = "file:does/not/exist.pt"
    write_params(dvc_repo / "params.yaml", params)
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run([sys.executable, "-m", "dvc", "repro"], cwd=dvc_repo, env=env, capture_output=True, text=True)
    assert proc.returncode != 0
    assert "checkpoint not found" in proc.stdout + proc.stderr
    assert (dvc_repo / "dvc.lock").read_text() == lock


@pytest.mark.slow
def test_compare_runs_dvc_experiments_and_tabulates(dvc_repo: Path):
    """`ferd compare --run` on the tiny setting: two variants as workspace dvc experiments, the
    teacher trained once, the table read back from `dvc exp show`, the workspace left as committed."""
    params = tiny_params(fae={**tiny_params()["fae"], "lambda_uni": 5.0},
                         distill={**tiny_params()["distill"], "adversary": "utae", "loss": "kl", "boundary": "none"})
    write_params(dvc_repo / "params.yaml", params)  # -S needs every switch spelled out
    (dvc_repo / "configs").mkdir()
    (dvc_repo / "configs" / "compare.yaml").write_text("distill: {steps: 2}\n")
    _run(["git", "add", "-A"], dvc_repo)
    _run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "tiny"], dvc_repo)
    committed = (dvc_repo / "params.yaml").read_bytes()
    ferd = [sys.executable, "-m", "stages.cli"]
    out = _run([*ferd, "compare", "--run", "--variants", "ferd,dfhl", "--seeds", "0",
                "--dvc", str(Path(sys.executable).parent / "dvc")], dvc_repo)
    assert out.count("Running stage 'fetch-teacher'") == 1  # trained once, then restored from the run cache
    md = (dvc_repo / "reports" / "compare.md").read_text()
    assert "| ferd | 1 |" in md and "| dfhl | 1 |" in md
    assert (dvc_repo / "params.yaml").read_bytes() == committed
    shown = _dvc(dvc_repo, "exp", "show", "--no-pager", "--csv")
    assert "ferd-s0" in shown and "dfhl-s0" in shown and "pgd_worst" in shown and "autoattack_nsd" in shown
    again = _run([*ferd, "compare", "--run", "--variants", "ferd,dfhl", "--seeds", "0",
                  "--dvc", str(Path(sys.executable).parent / "dvc")], dvc_repo)
    assert again.count("finished already, skipped") == 2
