"""benchmarks/signal_tracking.py: the analysis by hand, and a recorded run that is the stage's run
(same D every epoch, same rank correlation as metrics/synthesis.csv)."""

from __future__ import annotations

import csv
import math
import os

import pytest
from typer.testing import CliRunner

from ferd.artifacts import load_h5
from ferd.probe import rank_correlation
from stages.cli import app
from tests.conftest import load_benchmark, tiny_params, write_params


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("signal_tracking")


def test_smoothing_and_top_overlap_by_hand(bench):
    every = [[True, True]] * 3
    ds = bench.smoothed([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0]], every, 0.5)
    assert [d.tolist() for d in ds] == [[1.0, 0.0], [0.5, 0.5], [0.25, 0.75]]
    assert [d.tolist() for d in bench.smoothed([[1.0, 0.0], [0.0, 1.0]], every[:2], 0.0)] == [[1.0, 0.0], [0.0, 1.0]]
    # an absent class takes the present classes' mean first, then keeps its previous value
    ds = bench.smoothed([[0.4, 9.0, 0.2], [0.1, 9.0, 0.5]], [[True, False, True], [True, False, True]], 0.0)
    assert [d.tolist() for d in ds] == [[0.4, pytest.approx(0.3), 0.2], [0.1, pytest.approx(0.3), 0.5]]
    assert bench.top_overlap([4.0, 3.0, 2.0, 1.0], [1.0, 3.0, 4.0, 2.0], 2) == 1  # {0, 1} vs {2, 1}
    assert bench.top_overlap([4.0, 3.0, 2.0, 1.0], [4.0, 3.0, 2.0, 1.0], 3) == 3


def test_tracking_table_ranks_signal_and_both_diagnostics(bench):
    up, down = [0.1, 0.2, 0.3, 0.4], [0.4, 0.3, 0.2, 0.1]
    every = [True] * 4
    records = [{"D": up, "present": every, "diag": up, "big": down}, {"D": down, "present": every, "diag": up, "big": down},
               {"D": up, "present": every, "diag": None, "big": None}]  # no diagnostic that epoch: left out
    rows = bench.tracking_table(records, [0.0], k=2)
    assert rows[0]["corr"] == [pytest.approx(-1.0)] * 2 and rows[0]["top"] == [0, 0]
    sig_diag, sig_big = rows[1], rows[2]
    assert sig_diag["corr"] == [pytest.approx(1.0), pytest.approx(-1.0)] and sig_diag["mean"] == pytest.approx(0.0)
    assert sig_big["corr"] == [pytest.approx(-1.0), pytest.approx(1.0)] and sig_big["top_mean"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="no epoch with both diagnostics"):
        bench.tracking_table([{"D": up, "present": every, "diag": None, "big": None}], [0.0])


def test_a_recorded_run_is_the_stage_run(bench, tmp_path):
    base = tiny_params()
    params = tiny_params(reweight={**base["reweight"], "signal": "student", "floor": 0.2},
                         fae={**base["fae"], "shadow_adv_steps": 1})
    write_params(tmp_path / "params.yaml", params)
    cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        for stage in ("fetch-teacher", "probe", "reweight", "synth-fae"):
            result = CliRunner().invoke(app, [stage])
            assert result.exit_code == 0, f"{stage}:\n{result.output}"
        records = bench.record_run("params.yaml", "data/teacher/teacher.safetensors", "data/probe/probe.h5",
                                   "data/reweight/class_weights.json", big_per_class=8)
    finally:
        os.chdir(cwd)
    rows = list(csv.DictReader(open(tmp_path / "metrics/synthesis.csv")))
    pool, _ = load_h5(tmp_path / "data/fae/pool.h5", kind="pool")
    assert len(records) == len(rows) == base["fae"]["epochs"]
    in_use = bench.smoothed([r["D"] for r in records], [r["present"] for r in records], 0.0)
    for rec, row, d, d_used in zip(records, rows, in_use, pool["D_history"], strict=True):
        assert d.tolist() == pytest.approx(d_used.tolist(), abs=1e-12)  # the stage's D, epoch by epoch
        assert len(rec["big"]) == 4
        corr, logged = rank_correlation(d, rec["diag"]), float(row["rank_corr"])
        assert corr == pytest.approx(logged, abs=1e-5) or (math.isnan(corr) and math.isnan(logged))
