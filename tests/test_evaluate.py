"""`ferd evaluate` and `ferd report` on the tiny synthetic teacher, AutoAttack included."""

from __future__ import annotations

import csv
import json

from typer.testing import CliRunner

from stages.cli import app
from tests.conftest import tiny_params, write_params

runner = CliRunner()


def _evaluate(tmp_path, teacher, **evaluate):
    tmp_path.mkdir(parents=True, exist_ok=True)
    base = tiny_params()
    params = write_params(tmp_path / "params.yaml", tiny_params(evaluate={**base["evaluate"], **evaluate}))
    metrics = tmp_path / "metrics"
    result = runner.invoke(app, ["--params", str(params), "evaluate", "--name", "teacher", "--model", str(teacher),
                                 "--metrics-dir", str(metrics)])
    return result, metrics


def test_evaluate_writes_metrics_and_per_class_csv(tmp_path, tiny_teacher):
    result, metrics = _evaluate(tmp_path, tiny_teacher)
    assert result.exit_code == 0, result.output
    summary = json.loads((metrics / "teacher.json").read_text())
    for attack in ("clean", "fgsm", "pgd", "cw", "autoattack"):
        for key in ("avg", "worst", "nsd", "images", "worst_class"):
            assert f"{attack}_{key}" in summary, (attack, key)
        assert "worst10" not in f"{attack}_worst10" or f"{attack}_worst10" not in summary  # only for >= 100 classes
    assert summary["autoattack_version"] == "fast" and summary["autoattack_images"] == 8
    assert summary["clean_images"] == 48
    assert summary["clean_avg"] >= summary["pgd_avg"] >= 0
    assert summary["clean_worst"] <= summary["clean_avg"] + 1e-9
    assert set(summary) >= {"pgd_eps_x0.5_avg", "pgd_eps_x1_avg"}
    with open(metrics / "teacher_per_class.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [r["name"] for r in rows] == ["class0", "class1", "class2", "class3"]
    assert list(rows[0]) == ["class", "name", "clean", "fgsm", "pgd", "cw", "pgd_aa", "autoattack"]
    assert summary["pgd_aa_images"] == summary["autoattack_images"] == 8
    assert all(0 <= float(r[a]) <= 1 for r in rows for a in ("clean", "pgd", "autoattack"))
    # the per-class mean of clean accuracy equals the average (the split is balanced)
    clean = [float(r["clean"]) for r in rows]
    assert abs(sum(clean) / 4 - summary["clean_avg"]) < 1e-5
    assert "AA (fast)" in result.output


def test_evaluate_is_deterministic(tmp_path, tiny_teacher):
    r1, m1 = _evaluate(tmp_path / "a", tiny_teacher, autoattack="off")
    r2, m2 = _evaluate(tmp_path / "b", tiny_teacher, autoattack="off")
    assert r1.exit_code == r2.exit_code == 0
    assert (m1 / "teacher.json").read_bytes() == (m2 / "teacher.json").read_bytes()
    assert (m1 / "teacher_per_class.csv").read_bytes() == (m2 / "teacher_per_class.csv").read_bytes()


def test_evaluate_standard_autoattack_on_a_few_images(tmp_path, tiny_teacher):
    result, metrics = _evaluate(tmp_path, tiny_teacher, autoattack="standard", autoattack_per_class=1, eps_sweep=[])
    assert result.exit_code == 0, result.output
    summary = json.loads((metrics / "teacher.json").read_text())
    assert summary["autoattack_version"] == "standard" and summary["autoattack_images"] == 4


def test_evaluate_refuses_a_model_for_other_data(tmp_path, tiny_teacher):
    base = tiny_params()
    data = {**base["data"], "synthetic": {**base["data"]["synthetic"], "num_classes": 5}}
    params = write_params(tmp_path / "params.yaml", tiny_params(data=data))
    result = runner.invoke(app, ["--params", str(params), "evaluate", "--model", str(tiny_teacher),
                                 "--metrics-dir", str(tmp_path / "m")])
    assert result.exit_code == 1 and "check data.name" in result.output
    assert not (tmp_path / "m").exists()


def test_evaluate_missing_model_names_the_stage(tmp_path):
    params = write_params(tmp_path / "params.yaml", tiny_params())
    result = runner.invoke(app, ["--params", str(params), "evaluate", "--name", "student", "--model",
                                 str(tmp_path / "none.safetensors")])
    assert result.exit_code == 1 and "ferd distill" in result.output


def test_report_writes_figure_and_summary(tmp_path, tiny_teacher):
    result, metrics = _evaluate(tmp_path, tiny_teacher, autoattack="off")
    assert result.exit_code == 0
    # a second model's metrics (a copy) so the figure has two groups
    (metrics / "student.json").write_bytes((metrics / "teacher.json").read_bytes())
    (metrics / "student_per_class.csv").write_bytes((metrics / "teacher_per_class.csv").read_bytes())
    out = tmp_path / "reports"
    rep = runner.invoke(app, ["report", "--metrics-dir", str(metrics), "--out", str(out)])
    assert rep.exit_code == 0, rep.output
    png = (out / "per_class.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    text = (out / "summary.md").read_text()
    assert "| teacher | worst class |" in text and "| student | NSD |" in text and "class3" in text
    again = runner.invoke(app, ["report", "--metrics-dir", str(metrics), "--out", str(out)])
    assert again.exit_code == 0 and (out / "per_class.png").read_bytes() == png


def test_report_without_metrics_is_an_error(tmp_path):
    result = runner.invoke(app, ["report", "--metrics-dir", str(tmp_path), "--out", str(tmp_path / "r")])
    assert result.exit_code == 1 and "run `ferd evaluate`" in result.output


def test_pgd_is_reported_on_the_autoattack_images(tmp_path, tiny_teacher):
    """With the AutoAttack subset as large as the test split, PGD on the AA images is PGD on all of them:
    the two columns are the same predictions, not a second attack on other images."""
    result, metrics = _evaluate(tmp_path, tiny_teacher, autoattack_per_class=12, eps_sweep=[])
    assert result.exit_code == 0, result.output
    summary = json.loads((metrics / "teacher.json").read_text())
    assert summary["pgd_aa_images"] == summary["autoattack_images"] == summary["pgd_images"] == 48
    for key in ("avg", "worst", "nsd"):
        assert summary[f"pgd_aa_{key}"] == summary[f"pgd_{key}"]
    with open(metrics / "teacher_per_class.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert all(r["pgd_aa"] == r["pgd"] for r in rows)


def test_transfer_of_a_model_against_itself_is_one(tmp_path, tiny_teacher):
    """`--teacher` adds transfer (model clean / teacher clean per class): a teacher against itself transfers 1."""
    base = tiny_params()
    params = write_params(tmp_path / "params.yaml", tiny_params(evaluate={**base["evaluate"], "autoattack": "off",
                                                                           "eps_sweep": []}))
    metrics = tmp_path / "metrics"
    result = runner.invoke(app, ["--params", str(params), "evaluate", "--name", "student", "--model", str(tiny_teacher),
                                 "--teacher", str(tiny_teacher), "--metrics-dir", str(metrics)])
    assert result.exit_code == 0, result.output
    summary = json.loads((metrics / "student.json").read_text())
    assert summary["transfer_avg"] == 1.0 and summary["transfer_images"] == summary["clean_images"]
    with open(metrics / "student_per_class.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert list(rows[0])[-1] == "transfer"
    assert all(r["transfer"] == ("nan" if float(r["clean"]) == 0 else "1") for r in rows)


def test_transfer_is_the_per_class_ratio_of_clean_accuracies(tiny_teacher):
    """A student that always answers class 0 keeps all of class 0 and none of the others."""
    import torch

    from ferd.artifacts import load_model
    from ferd.config import params_from_mapping
    from ferd.data import load_split
    from ferd.evaluate import evaluate_model

    params = params_from_mapping(tiny_params(evaluate={**tiny_params()["evaluate"], "autoattack": "off", "eps_sweep": []}))
    teacher, _ = load_model(tiny_teacher)
    test = load_split(params.data, "test")

    class AlwaysZero(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            logits = torch.zeros(len(x), test.num_classes) + 0 * self.w
            logits[:, 0] = 1.0 + 0 * x.flatten(1).sum(1)
            return logits

    result = evaluate_model(AlwaysZero().eval(), test, params.evaluate, eps=params.data.eps, seed=0, reference=teacher)
    with torch.no_grad():
        teacher_clean = [float((teacher(test.images()[test.y == c]).argmax(1) == c).float().mean())
                         for c in range(test.num_classes)]
    assert teacher_clean[0] > 0
    assert abs(result.per_class["transfer"][0] - 1.0 / teacher_clean[0]) < 1e-9
    assert all(result.per_class["transfer"][c] == 0.0 for c in range(1, test.num_classes) if teacher_clean[c] > 0)
    assert result.summary["transfer"]["worst"] == 0.0
