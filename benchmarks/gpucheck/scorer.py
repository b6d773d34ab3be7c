"""Section 5: the SAR scorer at the Qwen3-1.7B shape (96 completions) with each attention backend of the packed path
and on the universal path, against the paper's way (two padded forwards with full logits), seconds per call and
peak memory."""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict

import torch

from .report import Run
from .settings import MiB, scorer_shape, tolerances
from .timing import Device, Unavailable, ratio

# Last, the universal path (the model's own forward in right-padded batches), which any backend's model may fall to.
SCORER_CONTENDERS = ("paper", "sarkern-flex", "sarkern-sdpa", "sarkern-flash", "sarkern-universal")


def _scorer_unavailable(name: str, device: Device) -> str | None:
    from sarkern.attention import flash_attn_available

    if name == "sarkern-flex" and not device.cuda:
        return "flex is refused on CPU tensors (sarkern.attention; Inductor's CPU FlexAttention is not trusted)"
    if name == "sarkern-flash" and not (device.cuda and flash_attn_available()):
        return "flash-attn is not installed" if device.cuda else "flash-attn needs CUDA"
    return None


def time_scorer(run: Run) -> None:
    import bench_scorer

    from sarkern.attention import flash_attn_available

    settings, device = run.settings, run.device
    shape = scorer_shape(settings)
    model = bench_scorer.build_model(shape, settings.device)
    prompts, completions, placeholder = bench_scorer.make_batch(shape)
    auto = "flash" if device.cuda and flash_attn_available() else ("flex" if device.cuda else "sdpa")
    dtype = getattr(torch, shape.dtype)
    bound = tolerances(dtype)["scorer_nll"]
    rows: dict[str, dict] = {}
    run.data["scorer"] = {
        "shape": asdict(shape),
        "completion_tokens": sum(map(len, completions)),
        "paper_micro_batch": settings.paper_micro_batch,
        "auto_backend": auto,
        "nll_bound": bound,
        "contenders": rows,
    }
    outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in SCORER_CONTENDERS:

        def measure(name=name):
            reason = _scorer_unavailable(name, device)
            if reason:
                raise Unavailable(reason)
            fn = bench_scorer.make_contender(
                name, model, prompts, completions, placeholder, paper_micro_batch=settings.paper_micro_batch
            )
            start = time.monotonic()
            out = fn()  # warm-up (FlexAttention compiles here)
            device.sync()
            warmup_s = time.monotonic() - start
            outputs[name] = tuple(t.detach().float().cpu() for t in out)
            del out
            # One timed call, then as many more as fit in half of what is left (the warm-up may have compiled).
            times, peak = device.timed_calls(fn, 1)
            more = min(settings.scorer_reps - 1, int(run.remaining() * 0.5 / max(times[0] / 1e3, 1e-3)))
            if more > 0:
                more_times, more_peak = device.timed_calls(fn, more)
                times, peak = times + more_times, max(peak, more_peak)
            return {
                "label": name,
                "warmup_s": warmup_s,
                "times_ms": times,
                "median_ms": statistics.median(times),
                "peak_extra_mib": peak / MiB,
                "scoring_path": getattr(fn, "scoring_path", None),
                "check": _scorer_check(name, outputs, bound),
            }

        rows[name] = run.measure(f"scorer {name}", measure)
    paper = rows.get("paper", {})
    for row in rows.values():
        if row.get("status") == "ok" and paper.get("status") == "ok":
            row["x_paper_time"] = row["median_ms"] / paper["median_ms"]
            row["x_paper_memory"] = ratio(row["peak_extra_mib"], paper["peak_extra_mib"])


def _scorer_check(name: str, outputs: dict, bound: float) -> dict:
    """Mean NLLs (log of the perplexities) of the scorer against the paper's way's."""
    if name == "paper" or "paper" not in outputs:
        return {}
    ours, paper = outputs[name], outputs["paper"]
    diff = max(float((a.double().log() - b.double().log()).abs().max()) for a, b in zip(ours, paper))
    return {"max_nll_diff_vs_paper": diff, "bound": bound, "ok": bool(diff <= bound)}
