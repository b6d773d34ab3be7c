"""benchmarks/bench_scorer.py's contenders at a tiny shape, so the scorer benchmark cannot rot: both scoring paths
(packed and universal) and the conditioned-half reuse agree with the paper's way, and each says which path ran."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import bench_scorer  # noqa: E402

TINY = bench_scorer.ScorerShape("tiny", 2, 64, 4, 2, 16, 128, 1000, 2, 3, 8, 4, 12, "float32")


@pytest.fixture(scope="module")
def outputs():
    model = bench_scorer.build_model(TINY, "cpu")
    prompts, completions, placeholder = bench_scorer.make_batch(TINY)
    results, paths = {}, {}
    for name in ("paper", "sarkern", "sarkern-universal", "sarkern-uncond"):
        fn = bench_scorer.make_contender(name, model, prompts, completions, placeholder, paper_micro_batch=4)
        results[name] = fn()
        paths[name] = getattr(fn, "scoring_path", None)
    return results, paths


def test_contenders_list_both_paths():
    assert {"paper", "sarkern", "sarkern-universal", "sarkern-uncond"} <= set(bench_scorer.CONTENDERS)
    assert {"sarkern", "sarkern-universal"} <= set(bench_scorer.BOTH_HALVES)


def test_each_scorer_contender_runs_its_path(outputs):
    _, paths = outputs
    assert paths["sarkern"] == "packed"  # auto on a plain Qwen3: the probe proves the packed path
    assert paths["sarkern-universal"] == "universal"
    assert paths["paper"] is None


def test_both_paths_agree_with_the_paper(outputs):
    results, _ = outputs
    assert bench_scorer.check_agreement(results) < 1e-4
    universal_c, universal_u = results["sarkern-universal"]
    packed_c, packed_u = results["sarkern"]
    torch.testing.assert_close(universal_c, packed_c, rtol=1e-4, atol=0)
    torch.testing.assert_close(universal_u, packed_u, rtol=1e-4, atol=0)
    # Given the conditioned log-probs, only the placeholder half runs: the same unconditioned perplexities.
    torch.testing.assert_close(results["sarkern-uncond"][1], packed_u, rtol=1e-4, atol=0)


def test_check_agreement_sees_the_universal_path():
    ones = torch.ones(3)
    results = {"paper": (ones, ones), "sarkern": (ones, ones), "sarkern-universal": (ones * 1.5, ones)}
    assert bench_scorer.check_agreement(results) == pytest.approx(0.5)


def test_rounds_are_interleaved():
    calls = []
    fns = {name: (lambda name=name: calls.append(name)) for name in ("paper", "sarkern", "sarkern-universal")}
    times = bench_scorer.time_interleaved(fns, 2)
    assert calls == ["paper", "sarkern", "sarkern-universal"] * 2
    assert {name: len(t) for name, t in times.items()} == {"paper": 2, "sarkern": 2, "sarkern-universal": 2}
