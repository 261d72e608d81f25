"""benchmarks/bench_paper.py in its --quick mode (tiny shapes): every part is timed and every preset projected."""

from __future__ import annotations

import importlib.util
import re
import sys

from ferd.presets import list_presets
from tests.conftest import REPO


def test_bench_paper_quick_prints_parts_and_projections(capsys, monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_paper", REPO / "benchmarks" / "bench_paper.py")
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_paper", bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    bench.main(["--quick", "--steps", "2"])
    out = capsys.readouterr().out
    presets = list_presets(REPO / "configs")
    assert len(presets) >= 4
    for part in ("synthesis step", "IB fit", "L_uni", "probe PGD", "distill step", "UTAE crafting", "peak memory"):
        assert out.count(part) == len(presets), part
    table = out.split("projected hours per preset")[1]
    for preset in presets:
        hours = re.search(rf"{re.escape(preset)}\s+([0-9.]+) h on cpu", table)
        assert hours is not None and float(hours.group(1)) > 0, (preset, table)
    assert "not counted (CUDA only" in out  # host syncs are counted on CUDA only
