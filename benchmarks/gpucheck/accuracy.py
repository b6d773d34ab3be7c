"""Every sarkern result checked once against float64 (log-probs, or gradients after backward), chunk by chunk so
that the float64 copies of section 4's [N, V] tensors never exist whole; the peers against sarkern."""

from __future__ import annotations

import math

import torch


def reference_forward(family: str, inputs, chunk: int = 1024) -> torch.Tensor:
    """float64 log-probs of every token, a chunk of rows at a time (the [N, V] float64 logits never exist whole)."""
    from sarkern import reference

    weight = inputs.weight.detach().double() if family == "linear" else None
    parts = []
    for i in range(0, inputs.targets.shape[0], chunk):
        rows = slice(i, i + chunk)
        if family == "linear":
            parts.append(
                reference.linear_token_logprobs(inputs.hidden[rows].detach().double(), weight, inputs.targets[rows])
            )
        else:
            parts.append(reference.token_logprobs(inputs.logits[rows].detach().double(), inputs.targets[rows]))
    return torch.cat(parts)


def reference_grads(family: str, inputs, chunk: int = 1024) -> list[torch.Tensor]:
    """float64 gradients of the summed log-probs w.r.t. the inputs, chunk by chunk (autograd accumulates the
    LM head's gradient across chunks)."""
    from sarkern import reference

    if family == "linear":
        weight = inputs.weight.detach().double().requires_grad_(True)
        grad_hidden = []
        for i in range(0, inputs.targets.shape[0], chunk):
            rows = slice(i, i + chunk)
            hidden = inputs.hidden[rows].detach().double().requires_grad_(True)
            reference.linear_token_logprobs(hidden, weight, inputs.targets[rows]).sum().backward()
            grad_hidden.append(hidden.grad.float())
        return [torch.cat(grad_hidden), weight.grad.float()]
    grads = []
    for i in range(0, inputs.targets.shape[0], chunk):
        logits = inputs.logits[i : i + chunk].detach().double().requires_grad_(True)
        reference.token_logprobs(logits, inputs.targets[i : i + chunk]).sum().backward()
        grads.append(logits.grad.float())
    return [torch.cat(grads)]


def rel_error(actual: torch.Tensor, expected: torch.Tensor, chunk: int = 1024) -> float:
    """||actual - expected|| / ||expected|| (Frobenius), a chunk of rows at a time: a [N, V] logits gradient is
    gigabytes, and whole-tensor temporaries would not fit beside the inputs."""
    err = norm = 0.0
    for i in range(0, actual.shape[0], chunk):
        a, e = actual[i : i + chunk].double(), expected[i : i + chunk].double()
        err += float(torch.sum((a - e) ** 2))
        norm += float(torch.sum(e**2))
    return math.sqrt(err / norm) if norm > 0 else (0.0 if err == 0 else math.inf)


def check_output(is_sarkern, backward, out, inputs, expected, sarkern_out, tol) -> dict:
    """sarkern: against the float64 reference (log-probs, or gradients after backward). Peers: their forward
    output against sarkern's (a peer computing something else shows here)."""
    if not is_sarkern:
        if backward or sarkern_out is None or out.shape != sarkern_out.shape:
            return {}
        return {"max_abs_diff_vs_sarkern": float((out.detach().float() - sarkern_out.float()).abs().max())}
    if expected is None:
        return {"ok": None, "note": "no reference (its computation failed)"}
    if not backward:
        err = float((out.detach().double() - expected).abs().max())
        return {"max_abs_error": err, "bound": tol["logprob_abs"], "ok": bool(err <= tol["logprob_abs"])}
    grads = [leaf.grad for leaf in inputs.leaves()]
    if any(g is None for g in grads):
        return {"ok": False, "note": "a gradient is missing"}
    errors = [rel_error(g, e) for g, e in zip(grads, expected)]
    worst = max(errors)
    return {"grad_rel_errors": errors, "bound": tol["grad_rel"], "ok": bool(worst <= tol["grad_rel"])}
