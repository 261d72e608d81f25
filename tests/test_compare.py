"""The comparison: experiment plan, reading `dvc exp show --json`, mean ± std and worst, table outputs, presets."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ferd.compare import (
    COLUMNS,
    Record,
    load_setting,
    markdown_table,
    parse_experiment_name,
    plan,
    records_from_exp_show,
    summarise,
    worst_class_chart,
)
from ferd.config import load_params
from ferd.errors import ConfigError, FerdError
from ferd.presets import list_presets, merged_params
from ferd.variants import VARIANTS

ROOT = Path(__file__).resolve().parents[1]


def _metrics(clean: float, pgd: float, aa: float, worst: float) -> dict:
    out = {}
    for name, avg in (("clean", clean), ("pgd", pgd), ("autoattack", aa)):
        out.update({f"{name}_avg": avg, f"{name}_worst": worst, f"{name}_nsd": 0.1, f"{name}_worst_class": "Shirt"})
    return out


def _exp(name: str, seed: int, metrics: dict | None, state: str = "success") -> dict:
    data = {"params": {"params.yaml": {"data": {"seed": seed}}},
            "metrics": {} if metrics is None else {"metrics/student.json": {"data": metrics}}}
    error = {"msg": "Experiment run failed", "type": ""} if state == "failed" else None
    return {"name": name, "executor": None if state == "success" else {"state": state},
            "revs": [{"name": name, "data": data, "error": error}]}


def _exp_show() -> list[dict]:
    return [
        {"rev": "workspace", "data": {}, "experiments": None},
        {"rev": "abc", "data": {}, "experiments": [
            _exp("ferd-s0", 0, _metrics(0.7, 0.40, 0.35, 0.10)),
            _exp("ferd-s1", 1, _metrics(0.8, 0.50, 0.45, 0.20)),
            _exp("plain-s0", 0, _metrics(0.6, 0.30, 0.25, 0.05)),
            _exp("plain-s1", 1, None, state="failed"),
            _exp("my-own-run", 0, _metrics(0.1, 0.1, 0.1, 0.1)),  # not a comparison experiment: ignored
            _exp("dfhl-s2", 2, None),  # finished without metrics: reported
        ]},
    ]


def test_plan_orders_seed_major_and_layers_overrides():
    exps = plan(["ferd", "plain"], [0, 1], {"fae.steps": 25, "utae.gamma": 0.9}, {"distill.steps": 5})
    assert [e.name for e in exps] == ["ferd-s0", "plain-s0", "ferd-s1", "plain-s1"]
    first = exps[0].overrides
    assert first["fae.steps"] == 25 and first["utae.gamma"] == 0.3  # the variant beats the setting
    assert first["seed"] == 0 and first["distill.steps"] == 5
    assert exps[0].command()[:5] == ["dvc", "exp", "run", "-n", "ferd-s0"]
    with pytest.raises(ConfigError, match="seed"):
        plan(["ferd"], [0], {"seed": 3})
    with pytest.raises(ConfigError, match="distinct"):
        plan(["ferd"], [0, 0], {})


def test_names_round_trip():
    assert parse_experiment_name("no-utae-gamma-s12") == ("no-utae-gamma", 12)
    assert parse_experiment_name("dfkd-rslad-s0") == ("dfkd-rslad", 0)
    assert parse_experiment_name("exp-1a2b3") is None
    assert parse_experiment_name("unknown-s0") is None


def test_records_keep_finished_and_report_the_rest():
    records, problems = records_from_exp_show(_exp_show())
    assert sorted(r.name for r in records) == ["ferd-s0", "ferd-s1", "plain-s0"]
    assert any(p.startswith("plain-s1") for p in problems) and any(p.startswith("dfhl-s2") for p in problems)


def test_summary_mean_std_worst_by_hand():
    records, _ = records_from_exp_show(_exp_show())
    rows = {r.variant: r for r in summarise(records)}
    assert list(rows) == ["ferd", "plain"]  # VARIANTS order
    mean, std = rows["ferd"].stats["pgd_avg"]
    assert mean == pytest.approx(0.45) and std == pytest.approx(math.sqrt(((0.05) ** 2 * 2) / 1))
    assert rows["ferd"].stats["autoattack_worst"][0] == pytest.approx(0.15)
    assert rows["plain"].seeds == (0,) and math.isnan(rows["plain"].stats["clean_avg"][1])
    md = markdown_table(list(rows.values()))
    assert "| ferd | 2 | 0.750 ± 0.071 |" in md and "| plain | 1 | 0.600 |" in md
    assert md.count("\n") == 4 and md.splitlines()[0].count("|") == len(COLUMNS) + 3


def test_summary_refuses_duplicate_seed():
    rec = Record("ferd-s0", "ferd", 0, _metrics(0.5, 0.5, 0.5, 0.5))
    with pytest.raises(FerdError, match="two experiments"):
        summarise([rec, rec])


def test_worst_class_chart_is_a_png(tmp_path):
    records, _ = records_from_exp_show(_exp_show())
    path = worst_class_chart(summarise(records), tmp_path / "c.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_compare_command_reads_exp_show(tmp_path, monkeypatch):
    from stages.cli import app

    monkeypatch.setattr("ferd.compare.exp_show", lambda dvc="dvc", cwd=Path("."): _exp_show())
    result = CliRunner().invoke(app, ["compare", "--out", str(tmp_path), "--variants", "ferd,plain",
                                      "--setting", str(ROOT / "configs" / "compare.yaml")])
    assert result.exit_code == 0, result.output
    assert "| ferd | 2 |" in (tmp_path / "compare.md").read_text()
    assert (tmp_path / "compare_worst_class.png").is_file()
    dry = CliRunner().invoke(app, ["compare", "--dry-run", "--variants", "dfhl", "--seeds", "4",
                                   "--setting", str(ROOT / "configs" / "compare.yaml")])
    assert dry.exit_code == 0 and "dvc exp run -n dfhl-s4" in dry.output and "-S distill.adversary=hee" in dry.output


def test_compare_setting_and_every_variant_validate():
    import yaml

    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    setting = load_setting(ROOT / "configs" / "compare.yaml")
    for exp in plan(list(VARIANTS), [0], setting):
        load_params(ROOT / "params.yaml", exp.overrides)  # raises on any bad key or value
        for key in exp.overrides:  # `dvc exp run -S` can only override keys that params.yaml spells out
            node = raw
            for part in key.split("."):
                assert isinstance(node, dict) and part in node, f"{key} is not in params.yaml"
                node = node[part]
    with pytest.raises(ConfigError, match="not found"):
        load_setting(ROOT / "configs" / "nope.yaml")


def test_presets_load_and_validate():
    names = list_presets(ROOT / "configs")
    assert {"cifar10-resnet18", "cifar10-mobilenetv2", "cifar100-resnet18", "tiny-imagenet-preactresnet18"} <= set(names)
    for name in names:
        merged = merged_params(name, ROOT / "params.yaml", ROOT / "configs")
        assert merged["data"]["name"] in ("cifar10", "cifar100", "tiny-imagenet")
    with pytest.raises(ConfigError, match="unknown preset"):
        merged_params("compare", ROOT / "params.yaml", ROOT / "configs")


def test_preset_command_writes_valid_params(tmp_path):
    from stages.cli import app

    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text())
    result = CliRunner().invoke(app, ["--params", str(params), "preset", "cifar10-mobilenetv2",
                                      "--configs", str(ROOT / "configs")])
    assert result.exit_code == 0, result.output
    p = load_params(params)
    assert (p.data.name, p.teacher.arch, p.distill.arch, p.fae.steps) == ("cifar10", "wrn34_10", "mobilenetv2", 200)
    bad = tmp_path / "configs"
    bad.mkdir()
    (bad / "broken.yaml").write_text("distill: {arch: resnet99}\n")
    before = params.read_bytes()
    result = CliRunner().invoke(app, ["--params", str(params), "preset", "broken", "--configs", str(bad)])
    assert result.exit_code == 1 and "distill.arch" in result.output and params.read_bytes() == before
