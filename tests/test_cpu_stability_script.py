"""benchmarks/cpu_stability.py: its summary arithmetic, and one tiny end-to-end run (no timing assertions)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import cpu_stability  # noqa: E402


def _call(wall: float) -> dict:
    return {"wall_s": wall, "cpu_s": 2 * wall, "minflt": 10}


def _run(naive: list[float], sarkern: list[float], floor: list[float], first: tuple[float, float]) -> dict:
    return {
        "loadavg": ["0.5 0.4 0.3", "0.6 0.4 0.3"],
        "first": {"naive": _call(first[0]), "sarkern": _call(first[1]), "floor": _call(1.0)},
        "rounds": {"naive": [*map(_call, naive)], "sarkern": [*map(_call, sarkern)], "floor": [*map(_call, floor)]},
    }


def test_summary_takes_ratios_round_by_round_and_keeps_the_worst():
    runs = [
        _run([2.0, 4.0], [1.0, 3.0], [0.5, 1.0], first=(2.0, 8.0)),
        _run([2.0, 2.0], [1.0, 5.0], [0.5, 0.5], first=(2.0, 4.0)),
    ]
    s = cpu_stability.summarize(runs)
    # Round ratios: 0.5, 0.75, 0.5, 2.5.
    assert s["ratio_to_naive"]["median"] == pytest.approx(0.625)
    assert s["ratio_to_naive"]["worst"] == pytest.approx(2.5)
    assert s["ratio_to_floor"]["worst"] == pytest.approx(10.0)
    assert s["worst_over_naive_worst"] == pytest.approx(5.0 / 4.0)
    assert s["sarkern"]["first_s"]["worst"] == 8.0 and s["sarkern"]["first_s"]["median"] == 6.0
    assert s["first_over_naive_first"]["worst"] == pytest.approx(4.0)
    assert s["naive"]["steady_s"]["n"] == 4 and s["sarkern"]["cpu_per_wall"] == pytest.approx(2.0)
    assert len(s["loadavg"]) == 4


def test_tiny_run_writes_both_conditions(tmp_path):
    cpu_stability.main(
        ["--processes", "1", "--rounds", "1", "--ops", "linear_forward", "--shape", "48", "16", "96"]
        + ["--threads", "2", "--out", str(tmp_path), "--tag", "smoke"]
    )
    result = json.loads((tmp_path / "smoke.json").read_text())
    summary = result["summary"]["linear_forward"]
    assert set(summary) == {"idle", "busy"}
    for cond in ("idle", "busy"):
        run = result["runs"]["linear_forward"][cond][0]
        assert run["threads"] == 2 and len(run["rounds"]["sarkern"]) == 1
        assert summary[cond]["ratio_to_naive"]["median"] > 0
    assert set(result["memory"]["linear_forward"]) == {"naive", "sarkern"}
    table = (tmp_path / "smoke.md").read_text()
    assert "| linear_forward | idle |" in table and "| linear_forward | busy |" in table
    assert result["machine"]["cores"] >= 1 and result["loadavg_start"]
