"""Section 4: `linear_token_logprobs` and `token_logprobs` forward and forward + backward, and `sequence_perplexity`
forward, every contender timed with its peak memory and set against the ceilings and the primary sarkern one."""

from __future__ import annotations

import torch

from .accuracy import check_output, reference_forward, reference_grads
from .report import Run
from .settings import MiB, tolerances
from .timing import Unavailable, nbytes, outcome_of, ratio, sarkern_backend
from .variants import forward_plan, kernel_candidates, primary_sarkern, refusal, sarkern_runner, sarkern_variants


def time_op_family(run: Run, family: str) -> None:
    """Every contender of `family` (`linear` or `logits`) forward and forward + backward at section 4's shape."""
    settings = run.settings
    dtype = getattr(torch, settings.dtype)
    if family == "linear":
        n, d, v = settings.linear
    else:
        (n, v), d = settings.logits, 0
    result: dict = {"shape": {"N": n, "D": d, "V": v, "dtype": settings.dtype}, "tolerances": tolerances(dtype)}
    run.data.setdefault("ops", {})[family] = result
    for mode in ("forward", "forward_backward"):
        result[mode] = _time_mode(run, family, mode == "forward_backward", (n, d, v), dtype, result)
        _ratios(run, family, mode, result[mode])


def _time_mode(run: Run, family: str, backward: bool, shape, dtype, result: dict) -> dict[str, dict]:
    import contenders

    settings, device = run.settings, run.device
    mode = "forward_backward" if backward else "forward"
    variants = sarkern_variants(run)
    candidates: list[str] = []  # timed after the peers: if the section's budget runs out, the candidates go first
    candidates_failed = None
    if family == "linear":
        try:
            found = kernel_candidates(run)
            variants.update(found)
            candidates = list(found)
        except Exception as error:  # a broken candidates hook costs its own row, not the section's others
            candidates_failed = outcome_of(error)
            print(f"   {family} {mode} kernel candidates: {candidates_failed['reason']}", flush=True)
    peers = {k: f for k, f in contenders.FAMILIES[family].items() if k != "sarkern"}
    inputs = contenders.make_inputs(
        family, *shape, dtype, settings.device, backward, seed=11, generate_on_device=device.cuda
    )
    # The float64 reference, once per mode: log-probs (forward) or gradients (forward + backward).
    reference = run.measure(
        f"{family} {mode} float64 reference",
        lambda: {"values": reference_grads(family, inputs) if backward else reference_forward(family, inputs)},
    )
    expected = reference.pop("values", None)
    result.setdefault("reference", {})[mode] = reference
    tol = result["tolerances"]
    rows: dict[str, dict] = {}
    outputs: dict[str, torch.Tensor] = {}
    primary = primary_sarkern(run)

    def clear_grads():
        for leaf in inputs.leaves():
            leaf.grad = None

    def measure(key: str) -> dict:
        refused = refusal(run, key, variants)
        if refused:
            raise Unavailable(refused)
        if key in variants:
            fn = sarkern_runner(family, variants[key], inputs, backward)
        else:
            fn = peers[key](inputs, backward)
        out = fn()  # warm-up: compilation, autotuning
        device.sync()
        check = check_output(key in variants, backward, out, inputs, expected, outputs.get(primary), tol)
        outputs[key] = out.detach()
        del out
        clear_grads()
        peak = device.peak_bytes(fn)
        clear_grads()
        allowed = nbytes(outputs[key]) + (nbytes(*inputs.leaves()) if backward else 0)
        p20, median, p80 = device.quantiles_ms(fn, settings.rep_ms)
        clear_grads()
        return {
            "check": check,
            "median_ms": median,
            "p20_ms": p20,
            "p80_ms": p80,
            "peak_extra_mib": peak / MiB,
            "extra_beyond_outputs_mib": (peak - allowed) / MiB,
        }

    for key in [*(k for k in variants if k not in candidates), *peers, *candidates]:
        rows[key] = run.measure(f"{family} {mode} {key}", lambda key=key: measure(key))
        if key in variants and variants[key].environment:
            rows[key]["environment"] = variants[key].environment
        if key in variants and family == "linear" and rows[key].get("status") == "ok":
            try:
                rows[key]["launch"] = forward_plan(variants[key], inputs)
            except Exception as error:  # a report detail: never worth the section's other rows
                rows[key]["launch"] = f"unknown ({outcome_of(error)['reason'][:200]})"
        if key != primary:
            outputs.pop(key, None)
    if candidates_failed:
        rows[f"{primary}, kernel candidates"] = candidates_failed
    return rows


def _ratios(run: Run, family: str, mode: str, rows: dict) -> None:
    """Each row's time against the ceiling of its family and mode, and against the primary sarkern contender."""
    ceil = run.data.get("ceilings", {})
    gemm, hbm = ceil.get("gemm", {}), ceil.get("hbm", {})
    floor_ms = None
    if family == "linear" and gemm.get("status") == "ok":
        floor_ms = gemm["three_ms"] if mode == "forward_backward" else gemm["forward_ms"]
    if family == "logits" and hbm.get("status") == "ok":
        n, v = run.settings.logits
        itemsize = torch.tensor([], dtype=getattr(torch, run.settings.dtype)).element_size()
        bytes_moved = n * v * itemsize * (2 if mode == "forward_backward" else 1)  # logits read (+ grad written)
        floor_ms = bytes_moved / (hbm["read_ceiling_GBps"] * 1e6)
    ours = rows.get(primary_sarkern(run), {})
    for row in rows.values():
        if row.get("status") != "ok":
            continue
        if floor_ms:
            row["x_ceiling"] = row["median_ms"] / floor_ms
        if ours.get("status") == "ok":
            row["x_sarkern_time"] = row["median_ms"] / ours["median_ms"]
            row["x_sarkern_memory"] = ratio(row["peak_extra_mib"], ours["peak_extra_mib"])
    rows_meta = run.data["ops"][family].setdefault("ceiling_ms", {})
    rows_meta[mode] = floor_ms


def time_sequence_perplexity(run: Run) -> None:
    """sequence_perplexity forward (the scorer's op) at section 4's shape: N tokens in equal segments."""
    import sarkern

    settings, device = run.settings, run.device
    dtype = getattr(torch, settings.dtype)
    n, d, v = settings.linear
    import contenders

    inputs = contenders.make_inputs(
        "linear", n, d, v, dtype, settings.device, False, seed=5, generate_on_device=device.cuda
    )
    segment_ids = torch.arange(n, device=settings.device) * settings.segments // n
    rows: dict[str, dict] = {}
    result = {
        "shape": {"N": n, "D": d, "V": v, "segments": settings.segments, "dtype": settings.dtype},
        "forward": rows,
    }
    run.data.setdefault("ops", {})["sequence_perplexity"] = result
    reference = run.measure(
        "sequence_perplexity float64 reference", lambda: {"values": reference_forward("linear", inputs)}
    )
    token_ref = reference.pop("values", None)
    expected = None
    if token_ref is not None:
        sums = torch.zeros(settings.segments, dtype=torch.float64, device=token_ref.device)
        sums.index_add_(0, segment_ids, token_ref)
        expected = torch.exp(-sums / torch.bincount(segment_ids, minlength=settings.segments))
    tol = tolerances(dtype)
    variants = sarkern_variants(run)
    for key, variant in variants.items():

        def measure(variant=variant, key=key):
            refused = refusal(run, key, variants)
            if refused:
                raise Unavailable(refused)

            def fn():
                with torch.no_grad(), sarkern_backend(variant.backend):
                    return sarkern.sequence_perplexity(
                        inputs.hidden, inputs.weight, inputs.targets, segment_ids, settings.segments, **variant.kwargs
                    )

            out = fn()
            check = {"ok": None}
            if expected is not None:
                err = float((out.double() / expected - 1).abs().max())
                check = {"max_rel_error": err, "bound": tol["ppl_rel"], "ok": bool(err <= tol["ppl_rel"])}
            return {
                "check": check,
                "peak_extra_mib": device.peak_bytes(fn) / MiB,
                "median_ms": device.median_ms(fn, settings.rep_ms),
            }

        rows[key] = run.measure(f"sequence_perplexity {key}", measure)
    linear_fwd = run.data.get("ops", {}).get("linear", {}).get("forward", {}).get(primary_sarkern(run), {})
    for row in rows.values():
        if row.get("status") == "ok" and linear_fwd.get("status") == "ok":
            row["x_linear_token_logprobs"] = row["median_ms"] / linear_fwd["median_ms"]
