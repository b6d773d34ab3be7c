"""Plain PyTorch reference of every op: full logits, no tricks. Slow and memory hungry on purpose.

Tests compare every backend against these functions evaluated in float64. They follow the same conventions as the
public ops (temperature, `ignore_index`, empty segments give NaN) so that a mismatch always means a bug.
"""

from __future__ import annotations

import torch


class _SoftCap(torch.autograd.Function):
    """`cap * tanh(z / cap)` whose gradient is sech^2(z / cap) from z itself. Autograd's own tanh backward forms
    1 - tanh^2 from the rounded tanh, which is 0 wherever tanh rounds to +-1 (|z| > 19 cap in float64): no digit of
    the true slope left for the ops' gradients to be compared with."""

    @staticmethod
    def forward(ctx, z: torch.Tensor, cap: float) -> torch.Tensor:
        ctx.save_for_backward(z)
        ctx.cap = cap
        return cap * torch.tanh(z / cap)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (z,) = ctx.saved_tensors
        return grad * torch.cosh(z / ctx.cap).reciprocal().square(), None  # cosh overflows to inf: slope 0


def soft_cap(logits: torch.Tensor, softcap: float) -> torch.Tensor:
    """Gemma 2's final-logit soft-capping, `softcap * tanh(logits / softcap)`."""
    return _SoftCap.apply(logits, softcap)


def token_logprobs(
    logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    softcap: float | None = None,
):
    """log softmax(logits / T)[target] and, optionally, the entropy of softmax(logits / T); 0 where ignored.
    With `softcap`, the logits are first replaced by `softcap * tanh(logits / softcap)`."""
    if softcap is not None:
        logits = soft_cap(logits, softcap)
    scaled = logits / temperature
    logp = torch.log_softmax(scaled, dim=-1)
    ignored = targets == ignore_index
    safe_targets = targets.masked_fill(ignored, 0).long()
    out = logp.gather(-1, safe_targets.unsqueeze(-1)).squeeze(-1).masked_fill(ignored, 0.0)
    if not return_entropy:
        return out
    probs = logp.exp()
    # 0 * log 0 := 0, also where the logit is -inf.
    entropy = -torch.where(probs > 0, probs * logp, torch.zeros_like(probs)).sum(-1)
    return out, entropy.masked_fill(ignored, 0.0)


def linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    softcap: float | None = None,
):
    logits = hidden @ weight.T
    if bias is not None:
        logits = logits + bias
    return token_logprobs(
        logits,
        targets,
        temperature=temperature,
        ignore_index=ignore_index,
        return_entropy=return_entropy,
        softcap=softcap,
    )


def sequence_perplexity(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    segment_ids: torch.Tensor,
    num_segments: int,
    *,
    bias: torch.Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
) -> torch.Tensor:
    """exp(-mean log-prob) per segment; tokens with a negative segment id are ignored; empty segments give NaN."""
    segment_ids = segment_ids.reshape(-1)
    keep = segment_ids >= 0
    safe_targets = torch.where(keep, targets.reshape(-1), torch.zeros_like(targets.reshape(-1)))
    logp = linear_token_logprobs(
        hidden.reshape(-1, hidden.shape[-1]), weight, safe_targets, bias=bias, temperature=temperature, softcap=softcap
    )
    sums = torch.zeros(num_segments, dtype=logp.dtype, device=logp.device)
    counts = torch.zeros(num_segments, dtype=logp.dtype, device=logp.device)
    sums = sums.index_add(0, segment_ids[keep].long(), logp[keep])
    counts = counts.index_add(0, segment_ids[keep].long(), torch.ones_like(logp[keep]))
    return torch.exp(-sums / counts)
