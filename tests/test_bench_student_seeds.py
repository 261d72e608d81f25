"""benchmarks/student_seeds.py: per-seed params and commands, the seed table's numbers, bad input, and a
two-seed run on the tiny synthetic setting (real `ferd distill` / `ferd evaluate` subprocesses)."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from stages.cli import app
from tests.conftest import load_benchmark, tiny_params, write_params


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("student_seeds")


def test_seed_params_apply_overrides_seed_and_autoattack(bench, tmp_path):
    base = write_params(tmp_path / "params.yaml", tiny_params())
    sets = bench.parse_set_options(["distill.steps=7", "distill.boundary=hee", "fae.lambda_uni=0"])
    assert sets == {"distill.steps": 7, "distill.boundary": "hee", "fae.lambda_uni": 0}
    raw = bench.seed_params(base, sets, 3, "off")
    assert raw["seed"] == 3 and raw["evaluate"]["autoattack"] == "off"
    assert raw["distill"]["steps"] == 7 and raw["distill"]["boundary"] == "hee" and raw["fae"]["lambda_uni"] == 0
    assert raw["distill"]["width"] == 4  # the rest of the base is kept
    assert yaml.safe_load(base.read_text())["seed"] == 0  # the base file is not touched
    with pytest.raises(bench.ConfigError, match="KEY=VALUE"):
        bench.parse_set_options(["distill.steps"])
    with pytest.raises(bench.ConfigError, match="not a section"):
        bench.seed_params(base, {"seed.x": 1}, 0, "off")


def test_stage_commands_share_or_make_the_pool(bench, tmp_path):
    inputs = bench.Inputs(Path("/t.safetensors"), Path("/pool.h5"), Path("/probe.h5"), Path("/utae.h5"))
    run, params = tmp_path / "seed-1", tmp_path / "seed-1/params.yaml"
    shared = bench.stage_commands(run, params, inputs, "distill", threads=2)
    assert [stage for stage, _ in shared] == ["distill", "evaluate"]
    argv = shared[0][1]
    assert argv[argv.index("--params") + 1] == str(params) and argv[argv.index("--threads") + 1] == "2"
    assert argv[argv.index("--pool") + 1] == "/pool.h5" and argv[argv.index("--out") + 1] == str(run / "student.safetensors")
    own = bench.stage_commands(run, params, inputs, "probe", threads=1)
    assert [stage for stage, _ in own] == ["probe", "reweight", "synth-fae", "gen-utae", "distill", "evaluate"]
    distill = own[4][1]
    assert distill[distill.index("--pool") + 1] == str(run / "pool.h5")  # this seed's pool, not the shared one
    assert distill[distill.index("--probe") + 1] == str(run / "probe.h5")


def _fake_run(run: Path, seed: int, transfer: dict[str, float], clean: float, pgd: float) -> None:
    run.mkdir(parents=True)
    (run / "params.yaml").write_text(yaml.safe_dump({"seed": seed}))
    (run / "student.json").write_text(json.dumps({"clean_avg": clean, "pgd_avg": pgd, "pgd_worst": 0.05,
                                                  "pgd_worst_class": "Shirt", "clean_images": 10000}))
    with open(run / "student_per_class.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["class", "name", "clean", "pgd", "transfer"])
        for i, (name, t) in enumerate(transfer.items()):
            w.writerow([i, name, 0.5, 0.2, t])


def test_summary_of_finished_seeds(bench, tmp_path, capsys):
    out = tmp_path / "runs"
    _fake_run(out / "seed-0", 0, {"Coat": 0.44, "Shirt": 0.41, "Bag": 0.98}, 0.76, 0.62)
    _fake_run(out / "seed-1", 1, {"Coat": 0.63, "Shirt": 0.66, "Bag": 0.97}, 0.78, 0.64)
    _fake_run(out / "seed-10", 10, {"Coat": 0.70, "Shirt": 0.59, "Bag": 0.99}, 0.77, 0.63)
    (out / "seed-2").mkdir()  # still running: no student.json
    records = [bench.read_run(out / f"seed-{s}") for s in (0, 1, 10)]
    assert bench.read_run(out / "seed-2") is None
    assert [(r["lowest"], r["lowest_class"]) for r in records] == [(0.41, "Shirt"), (0.63, "Coat"), (0.59, "Shirt")]
    s = bench.summarise(records, threshold=0.6)
    assert s["seeds"] == 3 and s["passing"] == 1
    assert s["lowest"]["mean"] == pytest.approx((0.41 + 0.63 + 0.59) / 3)
    assert s["lowest"]["std"] == pytest.approx(0.11718930554164629)  # sample std (n - 1)
    assert s["lowest"]["min"] == 0.41 and s["transfer"]["Coat"] == pytest.approx((0.44 + 0.63 + 0.70) / 3)
    bench.main(["--summary", str(out)])
    text = capsys.readouterr().out
    assert "3 finished, 1 pending" in text and "every class >= 0.6: 1 of 3" in text
    lines = [line for line in text.splitlines() if line.startswith("| ")]
    assert [line.split("|")[1].strip() for line in lines[1:4]] == ["0", "1", "10"]  # numeric seed order
    assert "Shirt 0.41, Coat 0.44" in lines[1]


def test_bad_input_writes_nothing(bench, tmp_path):
    out = tmp_path / "runs"
    teacher = tmp_path / "t.safetensors"
    teacher.write_bytes(b"")
    common = ["--out", str(out), "--teacher", str(teacher), "--from", "probe"]
    with pytest.raises(SystemExit, match="distill.nope"):  # unknown key: named, nothing written
        bench.main([*common, "--set", "distill.nope=1"])
    assert not out.exists()
    with pytest.raises(SystemExit, match="repeats a seed"):
        bench.main([*common, "--seeds", "0,0"])
    with pytest.raises(SystemExit, match="missing"):
        bench.main(["--out", str(out), "--teacher", str(teacher), "--pool", str(tmp_path / "no.h5")])
    out.mkdir()
    with pytest.raises(SystemExit, match="exists"):
        bench.main(common)


def test_two_seeds_on_one_pool(bench, tiny_teacher, tmp_path, capsys):
    params = write_params(tmp_path / "params.yaml", tiny_params())
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:  # the shared probe and pool, in process
        for argv in (["probe", "--teacher", str(tiny_teacher)], ["reweight"],
                     ["synth-fae", "--teacher", str(tiny_teacher)], ["gen-utae", "--teacher", str(tiny_teacher)]):
            result = CliRunner().invoke(app, ["--params", str(params), *argv])
            assert result.exit_code == 0, result.output
    finally:
        os.chdir(cwd)
    out = tmp_path / "seeds"
    bench.main(["--seeds", "0,1", "--out", str(out), "--jobs", "2", "--params", str(params),
                "--teacher", str(tiny_teacher), "--pool", str(tmp_path / "data/fae/pool.h5"),
                "--probe", str(tmp_path / "data/probe/probe.h5"), "--utae", str(tmp_path / "data/utae/utae.h5"),
                "--set", "distill.steps=2"])
    text = capsys.readouterr().out
    assert "2 finished" in text and "every class >= 0.6" in text
    for seed in (0, 1):
        run = out / f"seed-{seed}"
        written = yaml.safe_load((run / "params.yaml").read_text())
        assert written["seed"] == seed and written["distill"]["steps"] == 2 and written["evaluate"]["autoattack"] == "off"
        assert set(json.loads((run / "times.json").read_text())) == {"distill", "evaluate"}
        assert bench.read_run(run)["images"] == 48  # the tiny test split: 12 per class
    students = [(out / f"seed-{s}/student.safetensors").read_bytes() for s in (0, 1)]
    assert students[0] != students[1]  # the seed reaches the student
    bench.main(["--summary", str(out), "--by-margin", "--params", str(params), "--teacher", str(tiny_teacher)])
    text = capsys.readouterr().out
    assert "the 2 students get right" in text and "| class | seed-0 | seed-1 |" in text
    rows = [line for line in text.splitlines() if line.startswith("| ") and "margin [" not in line]
    assert [r.split("|")[1].strip() for r in rows[-5:]] == ["class0", "class1", "class2", "class3", "all"]


def test_margin_table_bins_the_teachers_right_answers(bench):
    import torch

    probs = torch.tensor([
        [0.90, 0.05, 0.05],  # class 0, margin 0.85 (sure)
        [0.50, 0.40, 0.10],  # class 0, margin 0.10 (close)
        [0.30, 0.60, 0.10],  # class 1, margin 0.30
        [0.00, 1.00, 0.00],  # class 1, margin 1.00 (the closed last bin)
        [0.60, 0.10, 0.30],  # class 2: the teacher is wrong (margin -0.30), never counted
    ])
    y = torch.tensor([0, 0, 1, 1, 2])
    torch.testing.assert_close(bench.teacher_margin(probs, y), torch.tensor([0.85, 0.10, 0.30, 1.00, -0.30]))
    students = [torch.tensor([0, 1, 1, 1, 2]),   # drops the close class-0 image
                torch.tensor([0, 0, 0, 1, 0])]   # drops the class-1 image at margin 0.30
    rows = {r["class"]: r for r in bench.margin_table(probs, students, y, ["a", "b", "c"])}
    assert [b["n"] for b in rows["a"]["bins"]] == [1, 0, 1] and [b["n"] for b in rows["b"]["bins"]] == [0, 1, 1]
    assert [b["n"] for b in rows["c"]["bins"]] == [0, 0, 0] and rows["all"]["bins"][2]["n"] == 2
    close, mid, sure = rows["a"]["bins"][0], rows["b"]["bins"][1], rows["all"]["bins"][2]
    assert (close["kept"], mid["kept"], sure["kept"]) == (0.5, 0.5, 1.0)
    assert close["std"] == pytest.approx(2 ** -0.5)  # kept 0 and 1 by the two students
    assert rows["a"]["kept"] == 0.75 and rows["b"]["kept"] == 0.75
    # all-class keep rates per bin: 0.5, 0.5, 1.0; class a's mix (one close, one sure) expects 0.75
    assert rows["a"]["expected"] == pytest.approx(0.75) and rows["b"]["expected"] == pytest.approx(0.75)
    assert rows["all"]["expected"] == pytest.approx(rows["all"]["kept"])
