"""Scaling with DVC: queued experiments N at a time (`ferd compare --jobs N`), a remote for a team.

One temporary git+DVC repository holds this project's dvc.yaml and code with the tiny synthetic
params; the module fixture runs the pipeline once and commits it (what `make run` and a commit
leave behind). Queued experiments run in temporary copies of it that hold only git- and
DVC-tracked files: they work because the dataset is a stage output (`fetch-data`).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_params, write_params

BIN = Path(sys.executable).parent
DVC = str(BIN / "dvc")


def _run(cmd: list[str], cwd: Path, ok: bool = True) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if ok:
        assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc


def _dvc(cwd: Path, *args: str) -> str:
    proc = _run([DVC, *args], cwd)
    return proc.stdout + proc.stderr


def _commit(repo: Path, message: str) -> None:
    _run(["git", "add", "-A"], repo)
    _run(["git", "commit", "-qm", message], repo)


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    """The tiny pipeline reproduced and committed (dvc.lock included), the comparison setting in configs/."""
    repo = tmp_path_factory.mktemp("scale") / "repo"
    repo.mkdir()
    shutil.copy(REPO / "dvc.yaml", repo / "dvc.yaml")
    for pkg in ("ferd", "stages"):
        shutil.copytree(REPO / pkg, repo / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    params = tiny_params(evaluate={"autoattack": "off"}, probe={"real_split": "none"}, fae={"lambda_uni": 5.0},
                         distill={"adversary": "utae", "loss": "kl", "boundary": "none"})  # -S needs every switch spelled out
    write_params(repo / "params.yaml", params)
    (repo / "configs").mkdir()
    (repo / "configs" / "compare.yaml").write_text("distill: {steps: 2}\n")
    _run(["git", "init", "-q"], repo)
    _dvc(repo, "init", "-q")
    _dvc(repo, "config", "core.analytics", "false")
    _dvc(repo, "repro")
    _commit(repo, "tiny pipeline, reproduced")
    return repo


def _ran(output: str) -> list[str]:
    return [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage")]


@pytest.mark.slow
def test_a_fresh_clone_pulls_everything_from_a_remote(baseline: Path, tmp_path: Path):
    """`dvc push` to a local-folder remote; a fresh clone's `dvc pull` leaves nothing to reproduce."""
    remote = tmp_path / "remote"
    _dvc(baseline, "remote", "add", "-d", "team", str(remote))
    _commit(baseline, "DVC remote for the team")
    _dvc(baseline, "push")
    clone = tmp_path / "clone"
    _run(["git", "clone", "-q", str(baseline), str(clone)], tmp_path)
    assert not (clone / "data" / "student" / "student.safetensors").exists()
    _dvc(clone, "pull")
    for out in ("data/raw/synthetic/fetched.json", "data/teacher/teacher.safetensors", "data/fae/pool.h5",
                "data/student/student.safetensors"):
        assert (clone / out).read_bytes() == (baseline / out).read_bytes(), out
    assert "Data and pipelines are up to date." in _dvc(clone, "status")
    assert _ran(_dvc(clone, "repro")) == [], "a pulled clone reproduces nothing"
    assert _run(["git", "status", "--porcelain"], clone).stdout == ""


@pytest.mark.slow
def test_compare_jobs_runs_queued_experiments_and_tabulates(baseline: Path):
    """`ferd compare --jobs 2`: two experiments through `dvc exp run --queue` and `dvc queue start -j 2`."""
    committed = (baseline / "params.yaml").read_bytes()
    ferd = [sys.executable, "-m", "stages.cli", "compare", "--variants", "ferd,no-utae-gamma", "--seeds", "0",
            "--dvc", DVC, "--poll", "2"]
    out = _run([*ferd, "--jobs", "2"], baseline)
    text = out.stdout + out.stderr
    assert "ferd-s0: queued" in text and "no-utae-gamma-s0: queued" in text and "2 at a time" in text
    md = (baseline / "reports" / "compare.md").read_text()
    assert "| ferd | 1 |" in md and "| no-utae-gamma | 1 |" in md
    assert (baseline / "params.yaml").read_bytes() == committed  # experiments ran elsewhere: the workspace is as committed
    assert _run(["git", "status", "--porcelain", "--untracked-files=no"], baseline).stdout == ""
    status = _dvc(baseline, "queue", "status")
    assert [line.split()[-1] for line in status.splitlines() if "-s0" in line] == ["Success", "Success"]
    log = _dvc(baseline, "queue", "logs", "ferd-s0")
    # the dataset came from DVC's cache into the queue's temporary copy; only what the variant changes ran
    assert "Stage 'fetch-data' didn't change, skipping" in log
    assert _ran(log) == ["distill", "evaluate@student"]
    again = _run([*ferd, "--jobs", "2"], baseline)
    assert (again.stdout + again.stderr).count("finished already, skipped") == 2
    assert "queued" not in again.stdout + again.stderr


@pytest.mark.slow
def test_a_failed_queued_experiment_is_named_with_its_log(baseline: Path):
    ferd = [sys.executable, "-m", "stages.cli", "compare", "--variants", "ferd", "--seeds", "1", "--set",
            "distill.width=0", "--dvc", DVC, "--poll", "2", "--jobs", "2"]
    proc = _run(ferd, baseline, ok=False)
    assert proc.returncode == 1
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "ferd-s1 (`" in errors[0] and "queue logs" in errors[0], proc.stderr
    task = errors[0].split("queue logs ", 1)[1].split("`", 1)[0]
    assert "distill.width" in _dvc(baseline, "queue", "logs", task)
