"""The comparison of method variants over seeds: plan the experiments, run them, tabulate the results.

An experiment is one ``dvc exp run -n <variant>-s<seed>`` of the whole pipeline with the variant's
switches (:mod:`ferd.variants`), the comparison setting (``configs/compare.yaml``: the budget every
variant shares) and ``seed``. The teacher has its own ``teacher.seed`` and the evaluation its own
``evaluate.seed``, so DVC's run cache trains and evaluates the teacher once for the whole comparison,
and variants whose synthesis params agree (same seed) share the synthesised pool.

Two ways to run them (:func:`run_experiments`, ``--jobs 1``: one after the other in the workspace;
:func:`run_queued`, ``--jobs N``: DVC's experiment queue, N at a time in temporary copies of the
repository). Both skip finished experiments and read the results back the same way.

The table: for every variant, mean ± sample standard deviation over its seeds of each run's
clean / PGD-20 / AutoAttack average accuracy, worst-class accuracy and NSD, read from the student's
``metrics/student.json`` of every experiment in ``dvc exp show --json``. Next to it, the paired
table (:func:`paired`): every variant minus the baseline (``plain``) seed by seed, because the
variants of one seed share the teacher and everything the seed decides, so the per-seed difference
is the comparison's sharpest figure; with the share of seeds each variant wins and how many of its
students transfer every class.
"""

from __future__ import annotations

import math
import re
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ferd.errors import ConfigError, FerdError
from ferd.variants import VARIANTS, set_flags, variant

__all__ = [
    "ATTACKS",
    "PAIRED_COLUMNS",
    "Paired",
    "TRANSFER_GOAL",
    "column_label",
    "fmt_points",
    "images_note",
    "paired",
    "paired_cells",
    "paired_header",
    "paired_markdown",
    "exp_show",
    "exp_show_settled",
    "fmt",
    "run_experiments",
    "run_queued",
    "SHARED_STAGES",
    "QueueEntry",
    "queue_entries",
    "queue_status",
    "queue_tasks",
    "COLUMNS",
    "Experiment",
    "Record",
    "Setting",
    "Summary",
    "experiment_name",
    "load_setting",
    "markdown_table",
    "parse_experiment_name",
    "plan",
    "records_from_exp_show",
    "summarise",
    "worst_class_chart",
]

#: The attacks of the table and, per attack, its three statistics (keys of metrics/student.json).
ATTACKS = ("clean", "pgd", "autoattack")
COLUMNS = tuple(f"{a}_{s}" for a in ATTACKS for s in ("avg", "worst", "nsd"))
_NAME = re.compile(r"^(?P<variant>[a-z0-9][a-z0-9-]*?)-s(?P<seed>\d+)$")


# --------------------------------------------------------------------------------------------
# planning


def experiment_name(variant_name: str, seed: int) -> str:
    """``<variant>-s<seed>``, the experiment name the table groups by."""
    return f"{variant_name}-s{seed}"


def parse_experiment_name(name: str) -> tuple[str, int] | None:
    """``(variant, seed)`` of a comparison experiment name, or None for any other experiment."""
    m = _NAME.match(name or "")
    if m is None or m["variant"] not in VARIANTS:
        return None
    return m["variant"], int(m["seed"])


@dataclass(frozen=True)
class Experiment:
    """One planned ``dvc exp run``: its name and every ``-S`` override, in order (later wins)."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)

    def command(self, dvc: str = "dvc") -> list[str]:
        return [dvc, "exp", "run", "-n", self.name, *set_flags(self.overrides)]


@dataclass(frozen=True)
class Setting:
    """The comparison setting: params overrides every experiment shares (the budget), and extra
    overrides for the headline variants (e.g. AutoAttack on more images), applied after the variant's."""

    overrides: dict[str, Any] = field(default_factory=dict)
    headline: tuple[str, ...] = ()
    headline_overrides: dict[str, Any] = field(default_factory=dict)


def load_setting(path: Path | None) -> Setting:
    """The comparison setting: a YAML mapping of params keys to values (validated later, by DVC's run),
    plus an optional ``headline: {variants: [...], set: {...}}`` section for the headline variants."""
    if path is None:
        return Setting()
    import yaml

    from ferd.config import yaml_load

    try:
        data = yaml_load(Path(path).read_text()) or {}
    except FileNotFoundError:
        raise ConfigError(f"comparison setting {path} not found; pass --setting with an existing YAML file") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) for k in data):
        raise ConfigError(f"{path}: expected a mapping of dotted params keys (e.g. 'fae.epochs: 8') to values")
    head = data.pop("headline", None) or {}
    if not isinstance(head, dict) or set(head) - {"variants", "set"} or not isinstance(head.get("variants", []), list):
        raise ConfigError(f"{path}: 'headline' must be a mapping with 'variants' (a list of names) and 'set' (params)")
    names = tuple(str(n) for n in head.get("variants", []))
    for name in names:
        variant(name)  # a clear error for an unknown name
    extra = head.get("set") or {}
    if not isinstance(extra, dict):
        raise ConfigError(f"{path}: 'headline.set' must be a mapping of params keys to values")
    return Setting(_flatten(data), names, _flatten(extra))


def _flatten(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def plan(variants: list[str], seeds: list[int], setting: Setting | dict[str, Any],
         extra: dict[str, Any] | None = None) -> list[Experiment]:
    """Every (variant, seed) experiment: setting, then the variant's switches, then (headline variants)
    the setting's headline overrides, then ``seed``, then ``extra``.

    Ordered seed-major, so a partial comparison has every variant for the first seeds; within a
    seed the variants that share synthesis run next to each other.
    """
    if isinstance(setting, dict):
        setting = Setting(dict(setting))
    if not variants:
        raise ConfigError("compare: no variants given")
    if not seeds or any(s < 0 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ConfigError(f"compare: seeds must be distinct non-negative integers, got {seeds}")
    if "seed" in setting.overrides or "seed" in setting.headline_overrides:
        raise ConfigError("compare: the setting must not fix 'seed'; the comparison sets it per experiment")
    out = []
    for seed in seeds:
        for name in variants:
            head = setting.headline_overrides if name in setting.headline else {}
            overrides = {**setting.overrides, **variant(name).overrides, **head, "seed": seed, **(extra or {})}
            out.append(Experiment(experiment_name(name, seed), overrides))
    return out


# --------------------------------------------------------------------------------------------
# reading results


@dataclass(frozen=True)
class Record:
    """One finished experiment's student metrics."""

    name: str
    variant: str
    seed: int
    metrics: dict[str, Any]


def records_from_exp_show(
    data: list[dict[str, Any]], metrics_file: str = "metrics/student.json"
) -> tuple[list[Record], list[str]]:
    """Records of every successful comparison experiment in ``dvc exp show --json`` output.

    Returns ``(records, problems)``: ``problems`` names each comparison experiment that failed,
    is still queued or running, or has no metrics (never silently dropped: the caller prints them).
    """
    if not isinstance(data, list):
        raise FerdError("dvc exp show --json: expected a list of baseline commits")
    records: list[Record] = []
    problems: list[str] = []
    for baseline in data:
        for exp in baseline.get("experiments") or []:
            name = exp.get("name") or ""
            parsed = parse_experiment_name(name)
            if parsed is None:
                continue
            revs = exp.get("revs") or []
            state = (exp.get("executor") or {}).get("state")
            if not revs or revs[0].get("error") or state in ("failed", "queued", "running"):
                problems.append(f"{name} ({state or 'failed'})")
                continue
            rev = revs[0].get("data") or {}
            metrics = ((rev.get("metrics") or {}).get(metrics_file) or {}).get("data")
            if not metrics:
                problems.append(f"{name} (no {metrics_file})")
                continue
            seed = ((rev.get("params") or {}).get("params.yaml") or {}).get("data", {}).get("seed", parsed[1])
            if seed != parsed[1]:
                problems.append(f"{name} (its params say seed {seed})")
                continue
            records.append(Record(name, parsed[0], parsed[1], dict(metrics)))
    return records, problems


# --------------------------------------------------------------------------------------------
# the table


@dataclass(frozen=True)
class Summary:
    """One variant's row: seeds used, and (mean, sample std) per column (std NaN with one seed)."""

    variant: str
    seeds: tuple[int, ...]
    stats: dict[str, tuple[float, float]]


def summarise(records: list[Record], columns: tuple[str, ...] = COLUMNS) -> list[Summary]:
    """Mean ± sample std (n − 1) over seeds per variant, in :data:`VARIANTS` order; NaN where a metric is absent."""
    rows = []
    for name in VARIANTS:
        mine = sorted((r for r in records if r.variant == name), key=lambda r: r.seed)
        if not mine:
            continue
        if len({r.seed for r in mine}) != len(mine):
            raise FerdError(f"compare: variant {name} has two experiments for one seed; remove the stale one with "
                            "`dvc exp remove`")
        stats = {}
        for col in columns:
            values = [float(r.metrics[col]) for r in mine if isinstance(r.metrics.get(col), int | float)]
            mean = statistics.fmean(values) if values else math.nan
            std = statistics.stdev(values) if len(values) >= 2 else math.nan
            stats[col] = (mean, std)
        rows.append(Summary(name, tuple(r.seed for r in mine), stats))
    return rows


def fmt(mean: float, std: float, digits: int = 3) -> str:
    """``0.512 ± 0.013``; ``0.512`` with one seed; ``–`` when absent."""
    if math.isnan(mean):
        return "–"
    return f"{mean:.{digits}f}" if math.isnan(std) else f"{mean:.{digits}f} ± {std:.{digits}f}"


_ATTACK_LABELS = {"clean": "clean", "pgd": "PGD-20", "autoattack": "AA", "pgd_aa": "PGD-20 on the AA images"}


def column_label(col: str) -> str:
    attack, stat = col.rsplit("_", 1)
    return f"{_ATTACK_LABELS[attack]} {stat}"


def markdown_table(rows: list[Summary], columns: tuple[str, ...] = COLUMNS) -> str:
    """The comparison as a GitHub markdown table (accuracy in [0, 1]; NSD lower is better)."""
    lines = ["| variant | seeds | " + " | ".join(column_label(c) for c in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for row in rows:
        cells = [fmt(*row.stats[c]) for c in columns]
        lines.append(f"| {row.variant} | {len(row.seeds)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


#: The differences of the paired table (variant − baseline on the same seed): the worst class first,
#: because the method's claim is about it, then the averages it must not give away.
PAIRED_COLUMNS = ("pgd_worst", "autoattack_worst", "pgd_avg", "autoattack_avg", "clean_avg")

#: A class "transfers" when the student keeps this fraction of the teacher's clean accuracy on it.
TRANSFER_GOAL = 0.6


@dataclass(frozen=True)
class Paired:
    """One variant against the baseline on the seeds both finished.

    ``diffs[col]``: mean and sample std over those seeds of (variant − baseline) in accuracy units
    (NaN where a metric is absent; std NaN with one seed); ``wins[col]``: seeds where the variant is
    strictly higher; ``transfer``: seeds where every class transfers ≥ :data:`TRANSFER_GOAL`
    (variant, baseline), ``None`` where the metrics predate ``transfer_worst``.
    """

    variant: str
    baseline: str
    seeds: tuple[int, ...]
    diffs: dict[str, tuple[float, float]]
    wins: dict[str, int]
    transfer: tuple[int, int] | None


def _transfers(metrics: dict[str, Any]) -> bool | None:
    value = metrics.get("transfer_worst")
    return None if not isinstance(value, int | float) else value >= TRANSFER_GOAL


def paired(records: list[Record], baseline: str = "plain", columns: tuple[str, ...] = PAIRED_COLUMNS) -> list[Paired]:
    """Every other variant against ``baseline``, seed by seed, in :data:`VARIANTS` order.

    The variants of a comparison share the teacher and (per seed) everything the seed does not
    switch, so the per-seed difference removes the seed's own luck from the comparison: a gap of
    2 points with a seed spread of 1.5 on each side can still hold in every seed. Variants with no
    seed in common with the baseline are left out; no baseline record gives an empty list.
    """
    by_key = {(r.variant, r.seed): r for r in records}
    base_seeds = {s for v, s in by_key if v == baseline}
    rows = []
    for name in VARIANTS:
        if name == baseline:
            continue
        seeds = tuple(sorted(s for v, s in by_key if v == name and s in base_seeds))
        if not seeds:
            continue
        diffs, wins = {}, {}
        for col in columns:
            pairs = [(by_key[(name, s)].metrics.get(col), by_key[(baseline, s)].metrics.get(col)) for s in seeds]
            deltas = [float(a) - float(b) for a, b in pairs if isinstance(a, int | float) and isinstance(b, int | float)]
            mean = statistics.fmean(deltas) if deltas else math.nan
            std = statistics.stdev(deltas) if len(deltas) >= 2 else math.nan
            diffs[col] = (mean, std)
            wins[col] = sum(d > 0 for d in deltas)
        mine = [_transfers(by_key[(name, s)].metrics) for s in seeds]
        theirs = [_transfers(by_key[(baseline, s)].metrics) for s in seeds]
        transfer = None if None in mine or None in theirs else (sum(mine), sum(theirs))
        rows.append(Paired(name, baseline, seeds, diffs, wins, transfer))
    return rows


def fmt_points(mean: float, std: float) -> str:
    """An accuracy difference in percentage points: ``+2.0 ± 1.9``; ``+2.0`` with one seed; ``–`` absent."""
    if math.isnan(mean):
        return "–"
    points = round(100 * mean, 1) + 0.0  # + 0.0: a difference that rounds to zero prints +0.0, not -0.0
    return f"{points:+.1f}" if math.isnan(std) else f"{points:+.1f} ± {100 * std:.1f}"


def paired_cells(row: Paired) -> list[str]:
    """The paired row's cells after the variant name: seeds, each difference with its wins, transfer."""
    n = len(row.seeds)
    cells = [str(n)]
    for col in row.diffs:
        mean, std = row.diffs[col]
        cells.append("–" if math.isnan(mean) else f"{fmt_points(mean, std)} ({row.wins[col]}/{n})")
    cells.append("–" if row.transfer is None else f"{row.transfer[0]}/{n} vs {row.transfer[1]}/{n}")
    return cells


def paired_header(rows: list[Paired]) -> list[str]:
    """The paired table's column titles for the columns :func:`paired` computed (markdown and terminal)."""
    columns = tuple(rows[0].diffs) if rows else PAIRED_COLUMNS
    return ["variant", "seeds", *[f"Δ {column_label(c)}" for c in columns], f"every class ≥ {TRANSFER_GOAL:g}"]


def paired_markdown(rows: list[Paired]) -> str:
    """The paired table in markdown, with a line that says how to read it; empty without rows."""
    if not rows:
        return ""
    base = rows[0].baseline
    header = paired_header(rows)
    lines = [f"Against `{base}`, seed by seed: the variant − `{base}` on the same seed in percentage points, "
             "mean ± std over the shared seeds, (seeds where the variant is higher / shared seeds); "
             f"last column: seeds where every class keeps ≥ {TRANSFER_GOAL:g} of the teacher's clean accuracy "
             f"(variant vs `{base}`).", "",
             "| " + " | ".join(header) + " |",
             "|" + "---|" * len(header)]
    lines += [f"| {row.variant} | " + " | ".join(paired_cells(row)) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def images_note(records: list[Record]) -> str:
    """What each figure rests on: the test images of clean / PGD-20 / AutoAttack (and its version)
    over all records, e.g. ``clean 10000, PGD-20 10000, AA (standard) 100 or 1000`` (different
    counts where the headline variants were attacked on more images); ``?`` where the metrics do not
    say. A worst-class figure rests on a tenth of them (class-balanced)."""
    def counts(key: str) -> str:
        values = sorted({int(r.metrics[key]) for r in records if isinstance(r.metrics.get(key), int | float)})
        return " or ".join(str(v) for v in values) if values else "?"

    versions = sorted({str(r.metrics["autoattack_version"]) for r in records if r.metrics.get("autoattack_version")})
    version = f" ({' or '.join(versions)})" if versions else ""
    return (f"Test images per figure: clean {counts('clean_images')}, PGD-20 {counts('pgd_images')}, "
            f"AA{version} {counts('autoattack_images')}; a worst-class figure rests on a tenth of them "
            "(class-balanced).")


def worst_class_chart(rows: list[Summary], path: Path) -> Path:
    """Bar chart of worst-class accuracy (clean, PGD-20, AA) per variant, mean with ±std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ferd.artifacts import atomic_path

    names = [r.variant for r in rows]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(names) + 2), 4.0))
    width = 0.8 / len(ATTACKS)
    for i, attack in enumerate(ATTACKS):
        means = [r.stats[f"{attack}_worst"][0] for r in rows]
        stds = [0.0 if math.isnan(r.stats[f"{attack}_worst"][1]) else r.stats[f"{attack}_worst"][1] for r in rows]
        xs = [j + (i - (len(ATTACKS) - 1) / 2) * width for j in range(len(rows))]
        ax.bar(xs, means, width, yerr=stds, capsize=3, label=_ATTACK_LABELS[attack])
    ax.set_xticks(range(len(rows)), names, rotation=20, ha="right")
    ax.set_ylabel("worst-class accuracy")
    ax.set_title("worst-class accuracy per variant (mean ± std over seeds)")
    ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------
# running


def _git(*args: str, cwd: Path) -> str:
    import subprocess

    proc = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        why = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        raise FerdError(f"git {' '.join(args)} failed: {why}")
    return proc.stdout


def exp_show(dvc: str = "dvc", cwd: Path = Path("."), timeout: float | None = None) -> list[dict[str, Any]]:
    """``dvc exp show --json`` of the repository at ``cwd`` (a FerdError when it takes longer than ``timeout`` s)."""
    import json
    import subprocess

    try:
        proc = subprocess.run([dvc, "exp", "show", "--json"], cwd=cwd, capture_output=True, text=True, check=False,
                              timeout=timeout)
    except subprocess.TimeoutExpired:
        raise FerdError(f"dvc exp show did not answer within {timeout:g} s") from None
    if proc.returncode != 0:
        tail = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else f"exit {proc.returncode}"
        raise FerdError(f"dvc exp show failed: {tail}")
    try:
        return json.loads(proc.stdout)
    except json.JSONDecodeError as e:
        raise FerdError(f"dvc exp show --json printed something that is not JSON ({e})") from None


# Workspace files an experiment leaves changed; restored from HEAD before each run and at the end
# (those of them that HEAD tracks: a fresh repository may not have committed dvc.lock yet).
_RESTORE = ("params.yaml", "dvc.lock", "metrics")


def _restore_from_head(cwd: Path) -> None:
    tracked = _git("ls-files", "--", *_RESTORE, cwd=cwd).splitlines()
    paths = [p for p in _RESTORE if any(t == p or t.startswith(f"{p}/") for t in tracked)]
    if "params.yaml" not in paths:
        raise FerdError("compare: params.yaml is not committed; dvc experiments start from HEAD, so commit it first")
    _git("checkout", "HEAD", "--", *paths, cwd=cwd)


def run_experiments(experiments: list[Experiment], *, dvc: str = "dvc", cwd: Path = Path("."),
                    echo: Any = print) -> list[str]:
    """Run each planned experiment in the workspace, one after the other; returns the names it ran.

    Experiments that already finished on this commit are skipped (a stopped comparison continues
    where it stopped); a failed one of the same name is removed and rerun. Before every run
    params.yaml, dvc.lock and metrics/ are restored from HEAD, so no experiment inherits another's
    params; at the end they are restored again, leaving the workspace as committed.

    This is ``ferd compare --jobs 1``. One at a time, :func:`run_queued` would add nothing but the
    queue's overhead; here each experiment's stage output streams to the terminal as it runs, and
    it works on commits older than the ``fetch-data`` stage (before it, the dataset was a
    git-ignored folder that queued experiments could not see).
    """
    import subprocess

    try:
        _git("rev-parse", "--verify", "HEAD", cwd=cwd)
    except FerdError:
        raise FerdError("compare: dvc exp needs a git repository with at least one commit; commit first") from None
    shown = exp_show(dvc, cwd)
    existing = {exp.get("name") for base in shown for exp in (base.get("experiments") or [])}
    done, _ = records_from_exp_show(shown)
    finished = {r.name for r in done}
    ran = []
    try:
        for i, exp in enumerate(experiments, 1):
            if exp.name in finished:
                echo(f"[{i}/{len(experiments)}] {exp.name}: finished already, skipped")
                continue
            if exp.name in existing:
                subprocess.run([dvc, "exp", "remove", exp.name], cwd=cwd, check=False, capture_output=True)
            _restore_from_head(cwd)
            echo(f"[{i}/{len(experiments)}] {exp.name}: {' '.join(exp.command(dvc)[1:])}")
            proc = subprocess.run(exp.command(dvc), cwd=cwd, check=False)
            if proc.returncode != 0:
                raise FerdError(f"compare: experiment {exp.name} failed (exit {proc.returncode}); fix the error above "
                                "and rerun: finished experiments are kept")
            ran.append(exp.name)
    finally:
        _restore_from_head(cwd)
    return ran


# --------------------------------------------------------------------------------------------
# running in DVC's experiment queue

#: The stages every experiment of a comparison shares: their params (data, teacher, evaluate) are
#: touched by no variant switch and not by ``seed`` (a test checks this against dvc.yaml), and the
#: setting and ``--set`` are the same for all experiments. :func:`run_queued` runs them once, in
#: the workspace, before queueing, so that N queue workers do not each train the same teacher.
#: ``evaluate@teacher`` pulls in ``fetch-data`` and ``fetch-teacher``.
SHARED_STAGES = ("evaluate@teacher",)

_PENDING = ("queued", "running")


@dataclass(frozen=True)
class QueueEntry:
    """One experiment in ``dvc exp show --json``: its name, commit (= queue task id), state, log file."""

    name: str
    rev: str
    state: str  # queued | running | success | failed
    log: str | None = None


def queue_entries(data: list[dict[str, Any]]) -> dict[str, list[QueueEntry]]:
    """Every named experiment of ``dvc exp show --json`` output, by name (a name can occur more than once)."""
    out: dict[str, list[QueueEntry]] = {}
    for baseline in data:
        for exp in baseline.get("experiments") or []:
            name = exp.get("name")
            revs = exp.get("revs") or []
            if not name or not revs:
                continue
            executor = exp.get("executor") or {}
            state = executor.get("state") or ("failed" if revs[0].get("error") else "success")
            log = (executor.get("local") or {}).get("log")
            out.setdefault(name, []).append(QueueEntry(name, str(revs[0].get("rev") or ""), str(state), log))
    return out


def _state(entries: list[QueueEntry]) -> str:
    """One state for a name: pending while any entry is, else success if any succeeded, else failed."""
    states = {e.state for e in entries}
    for state in (*_PENDING, "success"):
        if state in states:
            return state
    return "failed"


def _dvc(dvc: str, *args: str, cwd: Path, what: str, timeout: float | None = None) -> str:
    import subprocess

    try:
        proc = subprocess.run([dvc, *args], cwd=cwd, capture_output=True, text=True, check=False, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise FerdError(f"{what}: `{dvc} {' '.join(args)}` did not answer within {timeout:g} s") from None
    if proc.returncode != 0:
        lines = [line for line in (proc.stderr + proc.stdout).splitlines() if line.strip()]
        raise FerdError(f"{what}: `{dvc} {' '.join(args)}` failed ({lines[-1].strip() if lines else f'exit {proc.returncode}'})")
    return proc.stdout


def _start_workers(dvc: str, jobs: int, cwd: Path) -> None:
    """``dvc queue start -j jobs``. The workers it spawns inherit its stdout and stderr: pipes would
    stay open until the last worker exits, so its output goes to a file (read on failure)."""
    import subprocess
    import tempfile

    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.run([dvc, "queue", "start", "-j", str(jobs)], cwd=cwd, stdin=subprocess.DEVNULL,
                              stdout=log, stderr=subprocess.STDOUT, check=False)
        if proc.returncode != 0:
            log.seek(0)
            lines = [line for line in log.read().splitlines() if line.strip()]
            why = lines[-1] if lines else f"exit {proc.returncode}"
            raise FerdError(f"compare: `{dvc} queue start -j {jobs}` failed ({why})")


#: A poll that takes longer than this is abandoned and retried (DVC's commands can hang while a
#: worker cleans up an experiment's temporary copy).
_POLL_TIMEOUT = 120.0


def queue_status(text: str) -> tuple[dict[str, str], tuple[int, int] | None]:
    """``dvc queue status`` output: {task id (7 hex digits): status in lower case}, (active, idle) workers."""
    tasks = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 3 and re.fullmatch(r"[0-9a-f]{7,40}", parts[0]):
            tasks[parts[0][:7]] = parts[-1].lower()
    m = re.search(r"Worker status:\s*(\d+)\s+active,\s*(\d+)\s+idle", text)
    return tasks, ((int(m[1]), int(m[2])) if m else None)


def queue_tasks(text: str, names: list[str]) -> dict[str, str]:
    """``dvc queue status`` output: {name: its task id (7 hex digits)} for each of ``names`` listed.

    A name listed more than once keeps a queued or running task over a finished one. Read from
    the queue, not from ``dvc exp show``: that one opens every running experiment's temporary
    copy and fails when a worker removes the copy at that moment (a fast-failing experiment).
    """
    found: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) >= 4 and re.fullmatch(r"[0-9a-f]{7,40}", parts[0]) and parts[1] in names:
            task, state = parts[0][:7], parts[-1].lower()
            if parts[1] not in found or (state in ("queued", "preparing", "running")
                                         and found[parts[1]][1] not in ("queued", "preparing", "running")):
                found[parts[1]] = (task, state)
    return {name: task for name, (task, _) in found.items()}


def missing_keys(path: Path, experiments: list[Experiment]) -> list[str]:
    """The experiments' override keys that ``path`` (params.yaml) lacks, sorted.

    ``dvc exp run -S key=value`` only changes keys that exist (Hydra's override grammar), so an
    older params.yaml without a newer switch (e.g. ``distill.boundary``) fails inside DVC with a
    cryptic message; the comparison checks first.
    """
    from ferd.config import read_params_mapping

    data = read_params_mapping(path)
    missing = set()
    for key in {k for exp in experiments for k in exp.overrides}:
        node: Any = data
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                missing.add(key)
                break
            node = node[part]
    return sorted(missing)


def _params_with(path: Path, overrides: dict[str, Any]) -> str:
    """params.yaml's text with dotted ``overrides`` applied (comments are lost: the file is restored afterwards)."""
    import yaml

    from ferd.config import apply_overrides, yaml_load

    return yaml.safe_dump(apply_overrides(yaml_load(path.read_text()) or {}, overrides), sort_keys=False)


def _run_shared_stages(first: Experiment, dvc: str, cwd: Path) -> None:
    """``dvc repro`` of :data:`SHARED_STAGES` in the workspace with ``first``'s params (restored from HEAD after)."""
    import subprocess

    params = cwd / "params.yaml"
    params.write_text(_params_with(params, first.overrides))
    try:
        proc = subprocess.run([dvc, "repro", *SHARED_STAGES], cwd=cwd, check=False)
    finally:
        _restore_from_head(cwd)
    if proc.returncode != 0:
        raise FerdError(f"compare: the stages every experiment shares ({', '.join(SHARED_STAGES)} and what it needs) "
                        f"failed (exit {proc.returncode}); fix the error above, nothing was queued")


def exp_show_settled(dvc: str, cwd: Path, poll_seconds: float, sleep: Any, attempts: int = 5) -> list[dict[str, Any]]:
    """``dvc exp show --json``, asked again (``attempts`` times, ``poll_seconds`` apart) while it fails.

    It fails for a moment whenever a queue worker removes an experiment's temporary copy while
    ``exp show`` reads it (a worker tidying up after a run, or one still running from an earlier,
    interrupted ``ferd compare``); the last failure is raised.
    """
    for _ in range(attempts - 1):
        try:
            return exp_show(dvc, cwd, timeout=_POLL_TIMEOUT)
        except FerdError:
            sleep(poll_seconds)
    return exp_show(dvc, cwd, timeout=_POLL_TIMEOUT)


def run_queued(experiments: list[Experiment], *, jobs: int, dvc: str = "dvc", cwd: Path = Path("."),
               echo: Any = print, poll_seconds: float = 15.0, sleep: Any = time.sleep) -> list[str]:
    """Run the planned experiments in DVC's queue, ``jobs`` at a time; returns the names that finished now.

    1. Experiments already finished on this commit are skipped; those still queued or running (an
       earlier ``ferd compare`` that was interrupted: the queue's workers go on without it) are
       waited for, not queued again; every other entry of the same name (a failed run) is removed.
    2. :data:`SHARED_STAGES` run once in the workspace, so the experiments find the teacher in DVC's
       run cache instead of each training it.
    3. Each experiment is queued (``dvc exp run --queue -n NAME -S ...``) from params.yaml,
       dvc.lock and metrics/ as committed, then ``dvc queue start -j jobs`` starts the workers.
       Each experiment runs in a temporary copy of the repository holding the git- and DVC-tracked
       files; the dataset is there because it is a stage output (``fetch-data``).
    4. ``dvc queue status`` is polled every ``poll_seconds`` until none is queued or running (not
       ``dvc exp show``: it can hang while workers run); every change of state is echoed. Workers
       that vanished with experiments still queued (killed, machine restarted) are started again.
       The final states come from ``dvc exp show`` once the experiments are done.

    A failed experiment does not stop the others; at the end a :class:`FerdError` names each
    failed one and the command that shows its log (``dvc queue logs <task>``).
    """
    if jobs < 1:
        raise ConfigError(f"compare: --jobs must be >= 1, got {jobs}")
    try:
        _git("rev-parse", "--verify", "HEAD", cwd=cwd)
    except FerdError:
        raise FerdError("compare: dvc exp needs a git repository with at least one commit; commit first") from None
    shown = exp_show_settled(dvc, cwd, poll_seconds, sleep)
    entries = queue_entries(shown)
    done, _ = records_from_exp_show(shown)
    finished = {r.name for r in done}
    pending = [e.name for e in experiments if e.name not in finished and _state(entries.get(e.name, [])) in _PENDING]
    to_queue = [e for e in experiments if e.name not in finished and e.name not in pending]
    for i, exp in enumerate(experiments, 1):
        if exp.name in finished:
            echo(f"[{i}/{len(experiments)}] {exp.name}: finished already, skipped")
        elif exp.name in pending:
            echo(f"[{i}/{len(experiments)}] {exp.name}: already in the queue, waiting for it")
    if to_queue:
        for exp in to_queue:
            for entry in entries.get(exp.name, []):
                _dvc(dvc, "exp", "remove", entry.rev, cwd=cwd, what=f"compare: removing the earlier {exp.name}")
        _restore_from_head(cwd)
        echo(f"stages every experiment shares, once, in the workspace: dvc repro {' '.join(SHARED_STAGES)}")
        _run_shared_stages(to_queue[0], dvc, cwd)
        try:
            for exp in to_queue:
                _dvc(dvc, "exp", "run", "--queue", "-n", exp.name, *set_flags(exp.overrides), cwd=cwd,
                     what=f"compare: queueing {exp.name}")
                echo(f"{exp.name}: queued ({' '.join(exp.command(dvc)[1:])} --queue)")
        finally:
            _restore_from_head(cwd)
    waiting = [e.name for e in to_queue] + pending
    if not waiting:
        return []
    # Task ids from `dvc queue status`, as is the wait below: `dvc exp show` can hang while workers
    # run (treeverse/dvc#8762) and fails when one removes its temporary copy meanwhile (a worker
    # left from an earlier run may have taken a task already). Every earlier entry of a queued
    # name was removed above, so an entry of that name is ours whatever its state.
    tasks = queue_tasks(_dvc(dvc, "queue", "status", cwd=cwd, what="compare", timeout=_POLL_TIMEOUT), waiting)
    for name in waiting:
        if name not in tasks:
            raise FerdError(f"compare: {name} was queued but `dvc queue status` does not list it")
    _start_workers(dvc, jobs, cwd)
    echo(f"running {len(waiting)} experiment(s), {jobs} at a time (`dvc queue status` shows them; "
         "`dvc queue kill NAME` stops one)")
    last: dict[str, str] = {}
    idle_polls = poll_failures = 0
    start = time.monotonic()
    while True:
        try:
            status, workers = queue_status(_dvc(dvc, "queue", "status", cwd=cwd, what="compare", timeout=_POLL_TIMEOUT))
            poll_failures = 0
        except FerdError:
            poll_failures += 1
            if poll_failures >= 5:
                raise
            sleep(poll_seconds)
            continue
        states = {name: status.get(task, "missing") for name, task in tasks.items()}
        for name in waiting:
            if states[name] != last.get(name):
                echo(f"{name}: {states[name]} [{time.monotonic() - start:.0f} s]")
        last = states
        queued = [n for n, st in states.items() if st in ("queued", "preparing")]
        if not any(st in ("queued", "preparing", "running") for st in states.values()):
            break
        idle_polls = idle_polls + 1 if queued and workers == (0, 0) else 0
        if idle_polls >= 2:  # experiments queued, no worker left to run them
            echo(f"no queue worker is running but {len(queued)} experiment(s) wait: starting {jobs} again")
            _start_workers(dvc, jobs, cwd)
            idle_polls = 0
        sleep(poll_seconds)
    # a finished experiment has its own commit (no longer the task id): look it up by name
    entries = queue_entries(exp_show_settled(dvc, cwd, poll_seconds, sleep))
    # a task that vanished from the queue and from `dvc exp show` was removed (`dvc queue remove`), not
    # run: it has no log to read, so it is named apart from the failures
    removed = [n for n in waiting if last[n] == "missing" and not entries.get(n)]
    failed = [n for n in waiting if n not in removed
              and (last[n] != "success" or not any(e.state == "success" for e in entries.get(n, [])))]
    problems = []
    if failed:
        where = ", ".join(f"{n} (`{dvc} queue logs {tasks[n]}`)" for n in failed)
        problems.append(f"{len(failed)} of {len(waiting)} experiments failed: {where}; fix the error its log shows")
    if removed:
        problems.append(f"{len(removed)} of {len(waiting)} left the queue without running (removed?): "
                        f"{', '.join(removed)}")
    if problems:
        raise FerdError(f"compare: {'; '.join(problems)}; then rerun: finished experiments are kept")
    return waiting
