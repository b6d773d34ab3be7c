"""benchmarks/sar_step_share.py without a training run: the forced path reaches a scorer built the trainer's way
(no `scoring_path` passed), and the summary reads `sar/step_share` and `sar/packed_path` from `metrics.jsonl`."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import sar_step_share  # noqa: E402

from sarkern.scorer import SARScorer  # noqa: E402


@pytest.mark.parametrize("path, expected", [("universal", "universal"), ("auto", "auto")])
def test_the_forced_path_reaches_the_trainers_scorer(monkeypatch, tmp_path, path, expected):
    import sarkern.cli
    from sarkern.tiny import load_tiny_model

    monkeypatch.setitem(SARScorer.__init__.__kwdefaults__, "scoring_path", "auto")  # restored after the test
    seen = {}

    def fake_cli(argv):
        model, tokenizer = load_tiny_model()
        seen["argv"] = argv
        seen["requested"] = SARScorer(model, tokenizer).requested_path  # as the trainer builds it
        return 0

    monkeypatch.setattr(sarkern.cli, "main", fake_cli)
    assert sar_step_share._train_here(path, tmp_path / "run", 3, ["--seed", "1"]) == 0
    assert seen["requested"] == expected
    run_dir = str(tmp_path / "run")
    assert seen["argv"] == ["train", "--steps", "3", "--output-dir", run_dir, "--no-resume", "--seed", "1"]


def test_summary_of_a_run(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    rows = [
        {"step": 1, "sar/step_share": 0.3, "sar/seconds": 1.0, "sar/packed_path": 0.0},
        {"step": 2, "sar/step_share": 0.05, "sar/seconds": 0.1, "sar/packed_path": 0.0},
        {"step": 3, "sar/step_share": 0.07, "sar/seconds": 0.2, "sar/packed_path": 0.0},
        {"train_runtime": 9.0},
    ]
    metrics.write_text("".join(json.dumps(r) + "\n" for r in rows))
    summary = sar_step_share._summary(metrics)
    assert summary["steps"] == 3 and summary["packed_path"] == [0.0, 0.0, 0.0]
    assert summary["median_step_share"] == pytest.approx(0.07)
    assert summary["median_step_share_after_step_1"] == pytest.approx(0.06)
    assert summary["median_sar_seconds_after_step_1"] == pytest.approx(0.15)
