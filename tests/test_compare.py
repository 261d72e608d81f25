"""The comparison: experiment plan, reading `dvc exp show --json`, mean ± std and worst, table outputs, presets."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from ferd.compare import (
    COLUMNS,
    Record,
    fmt_points,
    images_note,
    load_setting,
    markdown_table,
    paired,
    paired_markdown,
    parse_experiment_name,
    plan,
    queue_status,
    queue_tasks,
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


def _rec(name: str, pgd_worst: float, aa_worst: float, pgd_avg: float, transfer_worst: float | None = None) -> Record:
    variant_name, seed = parse_experiment_name(name)
    metrics = {"pgd_worst": pgd_worst, "autoattack_worst": aa_worst, "pgd_avg": pgd_avg, "autoattack_avg": 0.5,
               "clean_avg": 0.7}
    if transfer_worst is not None:
        metrics["transfer_worst"] = transfer_worst
    return Record(name, variant_name, seed, metrics)


def test_paired_differences_by_hand():
    records = [
        _rec("plain-s0", 0.04, 0.02, 0.60, 0.5), _rec("plain-s1", 0.05, 0.03, 0.62, 0.7),
        _rec("plain-s2", 0.06, 0.00, 0.61, 0.4),
        _rec("ferd-student-s0", 0.07, 0.05, 0.61, 0.65), _rec("ferd-student-s1", 0.04, 0.06, 0.63, 0.55),
        _rec("ferd-student-s2", 0.10, 0.00, 0.60, 0.61),
        _rec("ferd-s1", 0.08, 0.01, 0.62),  # one shared seed, no transfer metric
        _rec("ferd-oracle-s7", 0.5, 0.5, 0.9),  # no seed shared with plain: left out
    ]
    rows = {r.variant: r for r in paired(records)}
    assert list(rows) == ["ferd", "ferd-student"]  # VARIANTS order, the baseline itself not paired
    student = rows["ferd-student"]
    assert student.seeds == (0, 1, 2)
    mean, std = student.diffs["pgd_worst"]  # +0.03, -0.01, +0.04
    assert mean == pytest.approx(0.02) and std == pytest.approx(math.sqrt((0.01**2 + 0.03**2 + 0.02**2) / 2))
    assert student.wins["pgd_worst"] == 2
    assert student.wins["autoattack_worst"] == 2  # +0.03, +0.03, 0.00 (a tie is not a win)
    assert student.diffs["autoattack_avg"] == (0.0, 0.0) and student.wins["autoattack_avg"] == 0
    assert student.transfer == (2, 1)  # 0.65 and 0.61 reach 0.6; plain's 0.7 does
    ferd = rows["ferd"]
    assert ferd.seeds == (1,) and ferd.diffs["pgd_worst"][0] == pytest.approx(0.03)
    assert math.isnan(ferd.diffs["pgd_worst"][1]) and ferd.transfer is None
    md = paired_markdown(list(rows.values()))
    assert "| ferd-student | 3 | +2.0 ± 2.6 (2/3) | +2.0 ± 1.7 (2/3) |" in md
    ferd_line = next(line for line in md.splitlines() if line.startswith("| ferd |"))
    assert ferd_line.startswith("| ferd | 1 | +3.0 (1/1) |") and ferd_line.endswith("| – |")  # no transfer metric
    assert paired(records, baseline="dfhl") == [] and paired_markdown([]) == ""
    assert fmt_points(-0.0004, math.nan) == "+0.0" and fmt_points(-0.0251, 0.01) == "-2.5 ± 1.0"
    only = paired_markdown(paired(records, columns=("pgd_worst",)))  # the table shows the columns paired computed
    assert "| variant | seeds | Δ PGD-20 worst | every class ≥ 0.6 |" in only


def test_images_note_names_every_count_and_version():
    base = {"clean_images": 10000, "pgd_images": 10000, "autoattack_version": "standard"}
    records = [Record("plain-s0", "plain", 0, {**base, "autoattack_images": 100}),
               Record("ferd-s0", "ferd", 0, {**base, "autoattack_images": 1000})]
    note = images_note(records)
    assert "clean 10000, PGD-20 10000, AA (standard) 100 or 1000;" in note


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

    monkeypatch.setattr("ferd.compare.exp_show", lambda dvc="dvc", cwd=Path("."), timeout=None: _exp_show())
    dvc = str(Path(sys.executable).parent / "dvc")  # the venv's, whether or not it is on PATH
    result = CliRunner().invoke(app, ["compare", "--out", str(tmp_path), "--variants", "ferd,plain",
                                      "--setting", str(ROOT / "configs" / "compare.yaml"), "--dvc", dvc])
    assert result.exit_code == 0, result.output
    md = (tmp_path / "compare.md").read_text()
    assert "| ferd | 2 |" in md
    assert "| ferd | 1 | +5.0 (1/1) | +5.0 (1/1) | +10.0 (1/1) | +10.0 (1/1) | +10.0 (1/1) | – |" in md  # ferd-s0 − plain-s0
    assert "against plain" in result.output
    assert "0.750 ± 0.071" in result.output  # the terminal table keeps whole numbers at any width, no `0.7…`
    assert (tmp_path / "compare_worst_class.png").is_file()
    dry = CliRunner().invoke(app, ["compare", "--dry-run", "--variants", "dfhl", "--seeds", "4",
                                   "--setting", str(ROOT / "configs" / "compare.yaml")])
    assert dry.exit_code == 0 and "dvc exp run -n dfhl-s4" in dry.output and "-S distill.adversary=hee" in dry.output


def test_compare_without_dvc_is_a_one_line_error(tmp_path):
    from stages.cli import app

    result = CliRunner().invoke(app, ["compare", "--out", str(tmp_path), "--dvc", str(tmp_path / "no-such-dvc")])
    assert result.exit_code == 1
    assert "the dvc executable" in result.output and "not found" in result.output and "Traceback" not in result.output


def test_compare_refuses_a_params_file_without_a_switch(tmp_path, monkeypatch):
    """`dvc exp run -S` cannot add keys: an older params.yaml without distill.boundary is a one-line error
    before anything runs, and the repository's params.yaml has every key every variant sets."""
    import yaml

    from ferd.compare import missing_keys
    from stages.cli import app

    assert missing_keys(ROOT / "params.yaml", plan(list(VARIANTS), [0, 1], load_setting(ROOT / "configs" / "compare.yaml"))) == []
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    del raw["distill"]["boundary"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    monkeypatch.chdir(tmp_path)
    dvc = str(Path(sys.executable).parent / "dvc")
    result = CliRunner().invoke(app, ["compare", "--run", "--variants", "ferd", "--seeds", "0",
                                      "--setting", str(ROOT / "configs" / "compare.yaml"), "--dvc", dvc])
    assert result.exit_code == 1 and "Traceback" not in result.output
    assert "params.yaml has no distill.boundary" in result.output


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
        assert merged["data"]["name"] in ("cifar10", "cifar100", "tiny-imagenet", "fashion-mnist")
        # every preset is the paper's method: its synthesis and reweighting switches are spelled out
        assert merged["fae"]["generator"] == "fresh" and merged["fae"]["ib_threshold"] == "global", name
        assert merged["fae"]["lambda_oh"] == 1.0 and merged["reweight"]["signal"] == "teacher", name
        assert merged["distill"]["boundary"] == "none", name  # and its distillation: no boundary term
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


# --------------------------------------------------------------------------------------------
# the experiment queue (ferd compare --jobs N)


def _resolved_stages(params: dict) -> dict[str, dict]:
    """dvc.yaml's stages with foreach expanded and ${...} filled from ``params``: name -> {deps, outs, params}."""
    import re

    import yaml

    def fill(text: str, extra: dict) -> str:
        def value(m: re.Match) -> str:
            node: object = {**params, **extra}
            for part in m[1].split("."):
                node = node[part]  # type: ignore[index]
            return str(node)

        return re.sub(r"\$\{([^}]+)\}", value, text)

    out = {}
    for name, stage in yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"].items():
        items = stage["foreach"].items() if "foreach" in stage else [(None, None)]
        body = stage.get("do", stage)
        for key, item in items:
            extra = {} if key is None else {"key": key, "item": item}
            full = name if key is None else f"{name}@{key}"
            outs = [next(iter(o)) if isinstance(o, dict) else o for o in body.get("outs", [])]
            out[full] = {"deps": [fill(d, extra) for d in body.get("deps", [])],
                         "outs": [fill(o, extra) for o in outs], "params": body.get("params", [])}
    return out


def test_shared_stages_are_untouched_by_variants_and_seeds():
    """What run_queued runs once for all experiments must not read a variant switch or `seed`."""
    import yaml

    from ferd.compare import SHARED_STAGES
    from ferd.variants import SWITCHES

    stages = _resolved_stages(yaml.safe_load((ROOT / "params.yaml").read_text()))
    producer = {out: name for name, st in stages.items() for out in st["outs"]}
    varying = {"seed"} | {key.split(".")[0] for key in SWITCHES} | set(SWITCHES)
    todo, seen = list(SHARED_STAGES), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        assert not varying & set(stages[name]["params"]), f"{name} reads {varying & set(stages[name]['params'])}"
        todo += [producer[d] for d in stages[name]["deps"] if d in producer]
    assert seen == {"fetch-data", "fetch-teacher", "evaluate@teacher"}


class FakeDvc:
    """Stands in for the dvc calls of ferd.compare.run_queued: scripted `dvc exp show` and `dvc queue status`
    answers, every other command recorded."""

    def __init__(self, shows: list[list[dict]], statuses: list[str] | None = None):
        self.shows, self.statuses, self.calls = shows, statuses or [], []

    def exp_show(self, dvc="dvc", cwd=Path("."), timeout=None):
        return self.shows.pop(0) if len(self.shows) > 1 else self.shows[0]

    def dvc(self, dvc, *args, cwd, what, timeout=None):
        self.calls.append(args)
        return self.statuses.pop(0) if args == ("queue", "status") else ""


def _queued(name: str, rev: str, state: str) -> dict:
    exp = _exp(name, int(name.rsplit("-s", 1)[1]), _metrics(0.5, 0.4, 0.3, 0.1) if state == "success" else None,
               state=state)
    exp["revs"][0]["rev"] = rev
    exp["executor"] = {"state": state, "local": {"log": f"/repo/.dvc/tmp/exps/run/{rev}/{rev}.out"}}
    return exp


def _status(rows: dict[str, str], workers: str) -> str:
    lines = ["Task     Name        Created    Status"] + [f"{task}  {name}  02:06 AM   {state}"
                                                         for task, (name, state) in rows.items()]
    return "\n".join(lines) + f"\n\nWorker status: {workers}\n"


def test_queue_status_parsing():
    text = _status({"ddddddd": ("plain-s0", "Running"), "0a1b2c3": ("", "Success")}, "1 active, 1 idle")
    text += "4e05eb4  e2      Aug 22, 2022   Failed\n"
    assert queue_status(text) == ({"ddddddd": "running", "0a1b2c3": "success", "4e05eb4": "failed"}, (1, 1))
    assert queue_status("nothing useful") == ({}, None)


def test_queue_tasks_reads_task_ids_by_name():
    text = _status({"aaaaaaa": ("plain-s0", "Failed"), "bbbbbbb": ("plain-s0", "Running"),
                    "ccccccc": ("ferd-s0", "Failed"), "ddddddd": ("other-s0", "Queued")}, "1 active, 0 idle")
    text += "eeeeeee  06:15 AM   Queued\n"  # an unnamed task: its second column is the time
    assert queue_tasks(text, ["plain-s0", "ferd-s0", "dfhl-s0"]) == {"plain-s0": "bbbbbbb", "ferd-s0": "ccccccc"}


def test_a_worker_that_took_the_task_already_does_not_break_the_wait(monkeypatch):
    """A worker left running from an earlier compare can run (and fail) a new task before the wait
    starts, and `dvc exp show` fails while it removes the task's temporary copy: the task id comes
    from `dvc queue status`, exp show is asked again, and the error names the failure and its log."""
    import ferd.compare as cmp

    answers = [[{"rev": "head", "experiments": []}], FerdError("dvc exp show failed: ERROR: directory ... does not exist"),
               [{"rev": "head", "experiments": [_queued("plain-s0", "aaaaaaa1", "failed")]}]]

    def exp_show(dvc="dvc", cwd=Path("."), timeout=None):
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    statuses = [_status({"aaaaaaa": ("plain-s0", "Failed")}, "0 active, 1 idle")] * 2
    fake = FakeDvc([], list(statuses))
    monkeypatch.setattr(cmp, "exp_show", exp_show)
    monkeypatch.setattr(cmp, "_dvc", fake.dvc)
    monkeypatch.setattr(cmp, "_git", lambda *a, cwd: "")
    monkeypatch.setattr(cmp, "_restore_from_head", lambda cwd: None)
    monkeypatch.setattr(cmp, "_run_shared_stages", lambda first, dvc, cwd: None)
    monkeypatch.setattr(cmp, "_start_workers", lambda dvc, jobs, cwd: None)
    slept = []
    with pytest.raises(FerdError) as err:
        cmp.run_queued(plan(["plain"], [0], {}), jobs=1, echo=lambda m: None, sleep=slept.append, poll_seconds=3)
    assert "1 of 1 experiments failed: plain-s0 (`dvc queue logs aaaaaaa`)" in str(err.value)
    assert answers == [] and slept == [3], "the task had ended: no wait, but exp show asked again after it failed"
    assert fake.statuses == [], "task ids and one poll from `dvc queue status`"


def test_exp_show_that_keeps_failing_is_reported(monkeypatch):
    import ferd.compare as cmp

    def exp_show(dvc="dvc", cwd=Path("."), timeout=None):
        raise FerdError("dvc exp show failed: broken")

    monkeypatch.setattr(cmp, "exp_show", exp_show)
    slept = []
    with pytest.raises(FerdError, match="broken"):
        cmp.exp_show_settled("dvc", Path("."), 2.0, slept.append, attempts=4)
    assert slept == [2.0, 2.0, 2.0]


def test_run_queued_skips_waits_requeues_and_names_the_failures(monkeypatch):
    import ferd.compare as cmp

    def show(*exps):
        return [{"rev": "head", "experiments": list(exps)}]

    shows = [
        show(_queued("ferd-s0", "aaaaaaa1", "success"),   # finished: skipped
             _queued("plain-s0", "bbbbbbb1", "failed"),   # failed before: removed, queued again
             _queued("dfhl-s0", "ccccccc1", "running")),  # still running from an interrupted compare: waited for
        show(_queued("plain-s0", "ddddddd1", "failed"), _queued("dfhl-s0", "ccccccc1", "success")),  # the end
    ]
    statuses = [
        _status({"ddddddd": ("plain-s0", "Queued"), "ccccccc": ("dfhl-s0", "Running")}, "0 active, 0 idle"),  # task ids
        _status({"ddddddd": ("plain-s0", "Queued"), "ccccccc": ("dfhl-s0", "Running")}, "0 active, 0 idle"),
        _status({"ddddddd": ("plain-s0", "Queued"), "ccccccc": ("dfhl-s0", "Success")}, "0 active, 0 idle"),
        _status({"ddddddd": ("plain-s0", "Running"), "ccccccc": ("dfhl-s0", "Success")}, "1 active, 0 idle"),
        _status({"ddddddd": ("plain-s0", "Failed"), "ccccccc": ("dfhl-s0", "Success")}, "0 active, 0 idle"),
    ]
    fake = FakeDvc(shows, statuses)
    started, shared, echoed = [], [], []
    monkeypatch.setattr(cmp, "exp_show", fake.exp_show)
    monkeypatch.setattr(cmp, "_dvc", fake.dvc)
    monkeypatch.setattr(cmp, "_git", lambda *a, cwd: "")
    monkeypatch.setattr(cmp, "_restore_from_head", lambda cwd: None)
    monkeypatch.setattr(cmp, "_run_shared_stages", lambda first, dvc, cwd: shared.append(first.name))
    monkeypatch.setattr(cmp, "_start_workers", lambda dvc, jobs, cwd: started.append(jobs))
    exps = plan(["ferd", "plain", "dfhl"], [0], {})
    with pytest.raises(FerdError) as err:
        cmp.run_queued(exps, jobs=2, echo=echoed.append, sleep=lambda s: None)
    message = str(err.value)
    assert "1 of 2 experiments failed" in message and "plain-s0 (`dvc queue logs ddddddd`)" in message
    assert "dfhl-s0" not in message
    assert fake.calls[0] == ("exp", "remove", "bbbbbbb1")
    queued = [c for c in fake.calls if c[:3] == ("exp", "run", "--queue")]
    assert [c[4] for c in queued] == ["plain-s0"] and "-S" in queued[0]
    assert shared == ["plain-s0"]
    assert started == [2, 2], "the workers vanished with plain-s0 still queued: started again"
    assert statuses == [], "polled until nothing was queued or running"
    assert any("ferd-s0: finished already, skipped" in e for e in echoed)
    assert any("dfhl-s0: already in the queue" in e for e in echoed)
    assert [e.split(" [")[0] for e in echoed if e.startswith("plain-s0: ")][-3:] == [
        "plain-s0: queued", "plain-s0: running", "plain-s0: failed"]


def test_run_queued_names_a_removed_experiment_apart_from_the_failures(monkeypatch):
    """A task taken out of the queue (`dvc queue remove`) vanishes from the status and from exp show:
    it did not fail and has no log, so the error says it was not run instead of pointing at a log."""
    import ferd.compare as cmp

    def show(*exps):
        return [{"rev": "head", "experiments": list(exps)}]

    shows = [show(), show(_queued("plain-s0", "aaaaaaa1", "success"))]  # dfhl-s0 was removed
    statuses = [_status({"aaaaaaa": ("plain-s0", "Queued"), "bbbbbbb": ("dfhl-s0", "Queued")}, "0 active, 0 idle"),
                _status({"aaaaaaa": ("plain-s0", "Running"), "bbbbbbb": ("dfhl-s0", "Queued")}, "1 active, 0 idle"),
                _status({"aaaaaaa": ("plain-s0", "Success")}, "0 active, 0 idle")]
    fake = FakeDvc(shows, statuses)
    monkeypatch.setattr(cmp, "exp_show", fake.exp_show)
    monkeypatch.setattr(cmp, "_dvc", fake.dvc)
    monkeypatch.setattr(cmp, "_git", lambda *a, cwd: "")
    monkeypatch.setattr(cmp, "_restore_from_head", lambda cwd: None)
    monkeypatch.setattr(cmp, "_run_shared_stages", lambda first, dvc, cwd: None)
    monkeypatch.setattr(cmp, "_start_workers", lambda dvc, jobs, cwd: None)
    with pytest.raises(FerdError) as err:
        cmp.run_queued(plan(["plain", "dfhl"], [0], {}), jobs=2, echo=lambda m: None, sleep=lambda s: None)
    message = str(err.value)
    assert "1 of 2 left the queue without running (removed?): dfhl-s0" in message
    assert "failed" not in message and "queue logs" not in message and "plain-s0" not in message


def test_run_queued_with_everything_finished_queues_nothing(monkeypatch):
    import ferd.compare as cmp

    fake = FakeDvc([[{"rev": "head", "experiments": [_queued("ferd-s0", "a1", "success")]}]])
    monkeypatch.setattr(cmp, "exp_show", fake.exp_show)
    monkeypatch.setattr(cmp, "_dvc", fake.dvc)
    monkeypatch.setattr(cmp, "_git", lambda *a, cwd: "")
    monkeypatch.setattr(cmp, "_start_workers", lambda *a: pytest.fail("nothing to run"))
    assert cmp.run_queued(plan(["ferd"], [0], {}), jobs=3, echo=lambda m: None) == []
    assert fake.calls == []
    with pytest.raises(ConfigError, match="--jobs"):
        cmp.run_queued([], jobs=0)


def test_params_override_keeps_off_a_string(tmp_path):
    """DVC reads params as YAML 1.2 and `-S` drops quotes: `off` must stay the string 'off' for ferd too."""
    from ferd.compare import _params_with
    from ferd.config import load_params, yaml_load

    params = tmp_path / "params.yaml"
    params.write_text((ROOT / "params.yaml").read_text().replace("autoattack: standard", "autoattack: off"))
    assert load_params(params).evaluate.autoattack == "off"
    text = _params_with(params, {"distill.steps": 3, "evaluate.autoattack": "off", "probe.real_split": "none"})
    data = yaml_load(text)
    assert data["distill"]["steps"] == 3 and data["evaluate"]["autoattack"] == "off"
    params.write_text(text)
    assert load_params(params).evaluate.autoattack == "off"


def test_dry_run_with_jobs_shows_the_queue_commands():
    from stages.cli import app

    dry = CliRunner().invoke(app, ["compare", "--dry-run", "--variants", "ferd,plain", "--seeds", "0", "--jobs", "2",
                                   "--setting", str(ROOT / "configs" / "compare.yaml")])
    assert dry.exit_code == 0, dry.output
    lines = dry.output.strip().splitlines()
    assert lines[0].startswith("dvc exp run --queue -n ferd-s0 -S") and lines[1].startswith("dvc exp run --queue -n plain-s0")
    assert lines[-1] == "dvc queue start -j 2"


def test_headline_overrides_apply_to_the_headline_variants_only(tmp_path):
    setting_file = tmp_path / "compare.yaml"
    setting_file.write_text("fae: {steps: 7}\nheadline:\n  variants: [ferd, plain]\n"
                            "  set: {evaluate: {autoattack_per_class: 100}}\n")
    setting = load_setting(setting_file)
    assert setting.overrides == {"fae.steps": 7} and setting.headline == ("ferd", "plain")
    exps = {e.name: e.overrides for e in plan(["ferd", "ferd-student", "plain"], [0, 1], setting)}
    assert exps["ferd-s1"]["evaluate.autoattack_per_class"] == 100 == exps["plain-s0"]["evaluate.autoattack_per_class"]
    assert "evaluate.autoattack_per_class" not in exps["ferd-student-s0"]
    assert all(o["fae.steps"] == 7 for o in exps.values())
    setting_file.write_text("headline:\n  variants: [nope]\n")
    with pytest.raises(ConfigError, match="unknown variant"):
        load_setting(setting_file)
    setting_file.write_text("headline: {variants: [ferd], bad: 1}\n")
    with pytest.raises(ConfigError, match="headline"):
        load_setting(setting_file)
