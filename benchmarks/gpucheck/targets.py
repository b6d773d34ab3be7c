"""Section 6: DESIGN.md section 4's targets, each met or missed with its ratio, from what the run measured."""

from __future__ import annotations

import torch

from .settings import Settings


def evaluate_targets(data: dict, settings: Settings) -> list[dict]:
    """DESIGN.md section 4's GPU targets from what was measured; a tiny CPU run computes them but judges none."""
    ops, ceil = data.get("ops", {}), data.get("ceilings", {})
    primary = data.get("primary_sarkern")
    targets = []

    def add(what, limit, ratio, better="lower", note=""):
        if ratio is None:
            status = "not measured"
        elif settings.name != "full":
            status = "not judged (tiny CPU run)"
        else:
            status = "met" if (ratio <= limit if better == "lower" else ratio >= limit) else "missed"
        targets.append({"what": what, "limit": limit, "better": better, "ratio": ratio, "status": status, "note": note})

    def row(family, mode):
        r = ops.get(family, {}).get(mode, {}).get(primary or "", {})
        return r if r.get("status") == "ok" else {}

    gemm = ceil.get("gemm", {}) if ceil.get("gemm", {}).get("status") == "ok" else {}
    fwd, fwd_bwd = row("linear", "forward"), row("linear", "forward_backward")
    add(
        "linear_token_logprobs forward / cuBLAS logits GEMM",
        1.10,
        fwd["median_ms"] / gemm["forward_ms"] if fwd and gemm else None,
        note=f"{primary}",
    )
    add(
        "linear_token_logprobs forward+backward / three cuBLAS GEMMs",
        1.45,
        fwd_bwd["median_ms"] / gemm["three_ms"] if fwd_bwd and gemm else None,
        note=f"{primary}",
    )
    for mode, r in (("forward", fwd), ("forward+backward", fwd_bwd)):
        add(
            f"linear_token_logprobs {mode} extra memory (MiB beyond inputs, outputs, gradients)",
            64.0,
            r["extra_beyond_outputs_mib"] if r else None,
            note="absolute MiB, not a ratio",
        )
    logits_fwd = row("logits", "forward")
    hbm = ceil.get("hbm", {}) if ceil.get("hbm", {}).get("status") == "ok" else {}
    achieved = None
    if logits_fwd and hbm:
        n, v = settings.logits
        itemsize = torch.tensor([], dtype=getattr(torch, settings.dtype)).element_size()
        achieved = (n * v * itemsize / (logits_fwd["median_ms"] * 1e6)) / hbm["read_ceiling_GBps"]
    add("token_logprobs forward: logits read bandwidth / measured HBM read", 0.85, achieved, better="higher")
    scorer = data.get("scorer", {})
    auto = scorer.get("auto_backend")
    srow = scorer.get("contenders", {}).get(f"sarkern-{auto}", {})
    prow = scorer.get("contenders", {}).get("paper", {})
    both = srow.get("status") == "ok" and prow.get("status") == "ok"
    note = f"backend {auto} (what auto picks here); paper's way in micro-batches of {scorer.get('paper_micro_batch')}"
    add("SAR scoring time / paper's way", 0.5, srow.get("x_paper_time") if both else None, note=note)
    add("SAR scoring peak memory / paper's way", 0.2, srow.get("x_paper_memory") if both else None, note=note)
    add("SAR overhead in a GRPO step", 0.05, None, note="not measured by gpu-check (needs a training run)")
    return targets
