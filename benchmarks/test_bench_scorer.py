"""SAR scoring: SARScorer against the paper's way (two padded forwards with full logits), time and peak memory.

Run: ``pytest benchmarks/test_bench_scorer.py --benchmark-only`` (about two minutes on a 2-core CPU). Each row has
its peak memory (``peak_mib``, a fresh process per contender on CPU) and the ratios to the paper's way
(``time_ratio_vs_paper``, ``memory_ratio_vs_paper``) in ``extra_info``; ``python benchmarks/bench_scorer.py`` prints
the same as a table. Contenders and shapes are defined in ``bench_scorer.py``.
"""

from __future__ import annotations

import pytest
import torch
from bench_scorer import (
    ATTENTION_CONTENDERS,
    BOTH_HALVES,
    CONTENDERS,
    CUDA,
    SHAPE,
    attention_contender_skip_reason,
    build_model,
    make_batch,
    make_contender,
    measure_peak,
)

_results: dict[str, dict] = {}  # contender -> {"outputs", "median_s", "peak"}: ratios to the paper's way


@pytest.fixture(scope="module")
def setup():
    model = build_model(SHAPE)
    return model, *make_batch(SHAPE)


ALL_CONTENDERS = [c for c in CONTENDERS if c not in ATTENTION_CONTENDERS] + [
    pytest.param(
        c,
        marks=pytest.mark.skipif(
            attention_contender_skip_reason(c) is not None, reason=str(attention_contender_skip_reason(c))
        ),
    )
    for c in ATTENTION_CONTENDERS
]


@pytest.mark.parametrize("contender", ALL_CONTENDERS)
def test_sar_scoring(benchmark, record_memory, setup, contender):
    model, prompts, completions, placeholder = setup
    benchmark.group = f"sar-scoring {SHAPE.name} ({SHAPE.batch} completions)"
    benchmark.extra_info.update(family="sar-scoring", contender=contender, shape=SHAPE.name)
    fn = make_contender(contender, model, prompts, completions, placeholder)
    if CUDA:
        outputs = benchmark.pedantic(lambda: (fn(), torch.cuda.synchronize())[0], rounds=5, warmup_rounds=1)
    else:
        outputs = benchmark.pedantic(fn, rounds=3, warmup_rounds=1)
    peak = measure_peak(contender)["extra_peak_bytes"]
    record_memory(peak)
    if contender == "sarkern-universal":
        assert fn.scoring_path == "universal"
    benchmark.extra_info["scoring_path"] = getattr(fn, "scoring_path", None)
    _results[contender] = {"outputs": outputs, "median_s": benchmark.stats.stats.median, "peak": peak}

    paper = _results.get("paper")
    if paper is not None:
        benchmark.extra_info["time_ratio_vs_paper"] = round(benchmark.stats.stats.median / paper["median_s"], 3)
        benchmark.extra_info["memory_ratio_vs_paper"] = round(peak / max(1, paper["peak"]), 3)
        if contender in BOTH_HALVES:  # the same numbers, or the comparison means nothing
            for ours, theirs in zip(outputs, paper["outputs"]):
                torch.testing.assert_close(ours.cpu().double(), theirs.cpu().double(), rtol=1e-4, atol=0)
