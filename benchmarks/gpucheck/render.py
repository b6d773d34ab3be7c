"""The markdown report, rendered from the run's data after every section, and the summary printed last."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .report import Run


def fmt(value, digits=3) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(fmt(v, digits) for v in value) + "]"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def _contender_table(rows: dict, ratio_keys: list[tuple[str, str]]) -> list[str]:
    import labels

    head = ["contender", "status", "median ms (p20-p80)", "peak MiB", *[title for title, _ in ratio_keys], "check"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, row in rows.items():
        status = row.get("status", "?")
        if status == "unavailable" and "not installed" in row.get("reason", ""):
            status = "not installed"
        check = row.get("check") or {}
        if "ok" in check:
            detail = ", ".join(f"{k} {fmt(v)}" for k, v in check.items() if k not in ("ok", "bound", "note"))
            verdict = {True: "ok", False: "FAILED"}.get(check["ok"], "?")
            check_text = f"{verdict} ({detail}; bound {fmt(check.get('bound'))})"
        else:
            check_text = ", ".join(f"{k} {fmt(v)}" for k, v in check.items())
        if status != "ok":
            check_text = row.get("reason", "")[:160].replace("|", "/").replace("\n", " ")
        cells = [
            key if key.startswith("sarkern") or key == "paper" else f"{key} ({labels.label(key)})",
            status,
            fmt(row.get("median_ms")) + (f" ({fmt(row['p20_ms'])}-{fmt(row['p80_ms'])})" if "p20_ms" in row else ""),
            fmt(row.get("peak_extra_mib")),
            *[fmt(row.get(k)) for _, k in ratio_keys],
            check_text,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _legend(data: dict) -> list[str]:
    """What each contender computes, in words (labels.py), for those that appear in this report."""
    import labels

    keys = []
    for family in ("linear", "logits"):
        for mode in ("forward", "forward_backward"):
            keys += list(data.get("ops", {}).get(family, {}).get(mode, {}))
    keys += list(data.get("scorer", {}).get("contenders", {}))
    lines = ["", "## Contenders", ""]
    for key in dict.fromkeys(keys):
        base = key.split("[")[0].split(",")[0]
        suffix = key[len(base) :].strip(", ")
        lines.append(f"- `{key}`: {labels.description(base)}" + (f" ({suffix})" if suffix else ""))
    return lines


def render(run: Run) -> str:
    data, settings = run.data, run.settings
    machine, versions, sk = data.get("machine", {}), data.get("versions", {}), data.get("sarkern", {})
    card = machine.get("gpu") or "CPU (no GPU)"
    out = [f"# gpu-check on {card}: {run.tag}", ""]
    out.append(
        f"Mode `{settings.name}` on {card}; wall time {data.get('wall_s')} s; started {data.get('started_utc')}."
    )
    if settings.name != "full":
        out.append(
            "Tiny CPU shapes (sarkern under Triton's interpreter and its torch path): tests the script, "
            "measures nothing about a GPU."
        )
    out += ["", "## Machine and versions", ""]
    for key, value in machine.items():
        out.append(f"- {key}: {'-' if value is None else value}")
    for key, value in versions.items():
        out.append(f"- {key}: {'not installed' if value is None else value}")
    out.append(
        f"- sarkern {sk.get('version')}: commit {sk.get('commit')}{' (dirty)' if sk.get('dirty') else ''}, "
        f"source digest {sk.get('source_digest')} (`python benchmarks/gpu_check.py --source-digest` here), "
        f"check_inputs {'supported' if sk.get('check_inputs') else 'absent'}, imported from {sk.get('imported_from')}"
    )
    for backend, why in (sk.get("refused_backends") or {}).items():
        out.append(f"- sarkern[{backend}] refused here: {why}")
    peers = data.get("peer_requirements") or {}
    for peer, why in (peers.get("lost") or {}).items():
        rows = sorted(row for row, reason in peers.get("rows_lost", {}).items() if reason.startswith(f"{peer} "))
        out.append(f"- peer {peer} not imported ({', '.join(rows) or 'no row of its own'} lost): {why}")
    out += ["", "## Targets", "", target_definitions(settings, card), ""]
    out += ["| target | limit | measured | status | note |", "|---|---|---|---|---|"]
    for t in data.get("targets", []):
        limit = f"{'<=' if t['better'] == 'lower' else '>='} {t['limit']}"
        out.append(f"| {t['what']} | {limit} | {fmt(t['ratio'])} | {t['status']} | {t['note']} |")
    out += [
        "",
        "## Sections",
        "",
        "Seconds inside the section; with its process's start-up (imports) in parentheses. Budget: what the section"
        " was given (its planned budget, less only what the sections after it needed of a run that ran late).",
        "",
    ]
    out += ["| section | status | seconds | budget (planned) | note |", "|---|---|---|---|---|"]
    for name, s in data.get("sections", {}).items():
        note = (s.get("reason") or "")[:200].replace("|", "/").replace("\n", " ")
        seconds = f"{s.get('seconds', '-')}" + (f" ({s['process_seconds']})" if "process_seconds" in s else "")
        planned = f" ({s['planned_s']:.0f})" if "planned_s" in s else ""
        out.append(f"| {name} | {s['status']} | {seconds} | {s['budget_s']:.0f}{planned} | {note} |")
    tests = data.get("tests")
    if tests:
        out += ["", "## GPU tests", ""]
        out.append(
            f"`{tests.get('command')}`: {tests.get('passed')} passed, {tests.get('failed')} failed, "
            f"{tests.get('errors')} errors, {tests.get('skipped')} skipped in {tests.get('seconds')} s "
            f"(exit {tests.get('exit_code')})."
        )
        for part, o in tests.get("parts", {}).items():
            out.append(
                f"- {part} ({', '.join(o.get('files', []))}): {o.get('passed')} passed, {o.get('failed')} failed, "
                f"{o.get('errors')} errors, {o.get('skipped')} skipped in {o.get('seconds')} s of "
                f"{o.get('timeout_s')} s (exit {o.get('exit_code')})"
            )
        check = tests.get("import_check") or {}
        if check:
            verdict = "the installed copy" if check.get("ok") else f"NOT the installed copy: {check.get('reason')}"
            out.append(f"- imported sarkern.kernels from {check.get('sarkern.kernels')}: {verdict}")
        out += [f"- FAILED {f}" for f in tests.get("failures", [])]
        out += [f"- skipped: {s}" for s in tests.get("skip_reasons", [])]
    ceil = data.get("ceilings", {})
    if ceil:
        hbm, gemm = ceil.get("hbm", {}), ceil.get("gemm", {})
        out += ["", "## Ceilings", ""]
        if hbm.get("status") == "ok":
            out.append(
                f"- HBM: copy {fmt(hbm['copy_GBps'], 4)} GB/s (read + written, {hbm['bytes'] / 2**30:.2f} GiB "
                f"copied), read {fmt(hbm['read_GBps'], 4)} GB/s (a sum); "
                f"read ceiling {fmt(hbm['read_ceiling_GBps'], 4)} GB/s"
            )
        else:
            out.append(f"- HBM: {hbm.get('status')}: {hbm.get('reason')}")
        if gemm.get("status") == "ok":
            out.append(
                f"- cuBLAS GEMMs at N={gemm['shape']['N']}, D={gemm['shape']['D']}, V={gemm['shape']['V']} "
                f"{gemm['shape']['dtype']}: logits {fmt(gemm['forward_ms'])} ms "
                f"({fmt(gemm['forward_TFLOPs'], 4)} TFLOP/s), grad hidden {fmt(gemm['grad_hidden_ms'])} ms, "
                f"grad weight {fmt(gemm['grad_weight_ms'])} ms, three {fmt(gemm['three_ms'])} ms"
            )
        else:
            out.append(f"- GEMM: {gemm.get('status')}: {gemm.get('reason')}")
    out += _legend(data)
    ratio_cols = [
        ("x ceiling", "x_ceiling"),
        ("x sarkern time", "x_sarkern_time"),
        ("x sarkern memory", "x_sarkern_memory"),
    ]
    titles = {
        "linear": "`linear_token_logprobs` (hidden states + LM head)",
        "logits": "`token_logprobs` (existing logits)",
    }
    for family, title in titles.items():
        fam = data.get("ops", {}).get(family)
        if not fam:
            continue
        shape = fam["shape"]
        for mode in ("forward", "forward_backward"):
            if mode not in fam:
                continue
            ceiling = fam.get("ceiling_ms", {}).get(mode)
            what = "GEMM" if family == "linear" else "HBM read"
            out += ["", f"## {title}, {mode.replace('_', ' + ')}", ""]
            out.append(
                f"N={shape['N']}, "
                + (f"D={shape['D']}, " if shape["D"] else "")
                + f"V={shape['V']}, {shape['dtype']}; "
                f"ceiling ({what}) {fmt(ceiling)} ms. Peak MiB: beyond the inputs (outputs and gradients included)."
            )
            out.append("")
            out += _contender_table(fam[mode], ratio_cols)
            plans = [(key, row["launch"]) for key, row in fam[mode].items() if row.get("launch")]
            if plans and mode == "forward":
                out += ["", "How each sarkern row's fused forward launched:", ""]
                out += [f"- `{key}`: {plan}" for key, plan in plans]
    sp = data.get("ops", {}).get("sequence_perplexity")
    if sp:
        s = sp["shape"]
        out += [
            "",
            "## `sequence_perplexity`, forward",
            "",
            f"N={s['N']}, D={s['D']}, V={s['V']}, {s['segments']} segments, {s['dtype']}.",
            "",
        ]
        out += _contender_table(sp["forward"], [("x linear_token_logprobs", "x_linear_token_logprobs")])
    scorer = data.get("scorer")
    if scorer:
        s = scorer["shape"]
        out += ["", "## SAR scoring", ""]
        out.append(
            f"`{s['name']}`: {s['layers']} layers, hidden {s['hidden']}, vocab {s['vocab']}, {s['dtype']}; "
            f"{s['num_prompts']} prompts x {s['group']} completions, prompt {s['prompt_len']}, completions "
            f"{s['min_completion']}..{s['max_completion']} tokens ({scorer['completion_tokens']} in all). The paper's "
            f"way: two padded forwards with full logits, {scorer['paper_micro_batch']} completions per forward. "
            f"`auto` picks {scorer['auto_backend']} here."
        )
        out.append("")
        out += _contender_table(
            scorer["contenders"], [("x paper time", "x_paper_time"), ("x paper memory", "x_paper_memory")]
        )
    return "\n".join(out) + "\n"


def target_definitions(settings, card: str) -> str:
    """What each target measures, in words and at this run's shapes: the report stands on its own."""
    n, d, v = settings.linear
    ln, lv = settings.logits
    return (
        f"Measured on {card} in this run, {settings.dtype}. `linear_token_logprobs` (hidden [{n}, {d}] and LM head "
        f"[{v}, {d}] to per-token log-probs): forward without grad within 1.10 x a bare cuBLAS GEMM of the logits' "
        "shape; forward + backward within 1.45 x three bare cuBLAS GEMMs (the logits and the two gradients); either "
        "at most 64 MiB beyond its inputs, outputs and gradients. `token_logprobs` from existing logits "
        f"[{ln}, {lv}]: one read of the logits at >= 85% of the HBM read bandwidth measured here. SAR scoring of "
        "96 completions (16 prompts x 6, prompt 256, completions up to 2048 tokens, Qwen3-1.7B's shape) on the "
        "GPU, a tiny model on the CPU: <= 0.5 x the time and <= 0.2 x the peak memory of the paper's way (two "
        "padded forwards with full logits, in micro-batches of 8). SAR's overhead in a GRPO step: <= 5% of the "
        "step (needs a training run: not measured here)."
    )


def summary(run: Run) -> list[str]:
    """The short table printed last (the device tool returns the end of the output)."""
    lines = ["== summary", "| target | measured | status |", "|---|---|---|"]
    for t in run.data.get("targets", []):
        lines.append(f"| {t['what']} | {fmt(t['ratio'])} | {t['status']} |")
    for name, s in run.data.get("sections", {}).items():
        seconds = s.get("process_seconds", s.get("seconds"))
        lines.append(
            f"section {name}: {s['status']} in {seconds} s of {s.get('budget_s', 0):.0f} {s.get('reason', '')[:120]}"
        )
    tests = run.data.get("tests") or {}
    if tests:
        check = tests.get("import_check") or {}
        lines.append(
            f"tests: {tests.get('passed')} passed, {tests.get('failed')} failed, {tests.get('errors')} errors, "
            f"{tests.get('skipped')} skipped; sarkern.kernels from the installed copy: {check.get('ok')}"
        )
    return lines
