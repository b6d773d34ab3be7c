"""The shared-prefix attention's definition, densely in float64, and the fp32 bound every backend must meet."""

from __future__ import annotations

import torch
from scorer_models import FP32_UNIT_ROUNDOFF

from sarkern.attention import PackedLayout


def dense_layout_mask(layout: PackedLayout, window: int | None) -> torch.Tensor:
    """bool ``[T, T]``: packed row ``q`` may attend to packed row ``k``, straight from the segments' definition
    (query ``j`` at position ``prefix_len + j``; prefix row ``i`` at position ``i``, own row ``i`` at
    ``prefix_len + i``; causal; keys closer than ``window`` positions)."""
    mask = torch.zeros(layout.total_len, layout.total_len, dtype=torch.bool)
    for seg in layout.segments:
        rows = list(range(seg.prefix_start, seg.prefix_start + seg.prefix_len)) + list(
            range(seg.query_start, seg.query_start + seg.query_len)
        )
        for j in range(seg.query_len):
            q_pos = seg.prefix_len + j
            for k_pos, k_row in enumerate(rows):
                if k_pos <= q_pos and (window is None or q_pos - k_pos < window):
                    mask[seg.query_start + j, k_row] = True
    return mask


def dense_reference(query, key, value, layout, scaling, window, softcap=None):
    """Segment by segment with explicit positions and a dense mask per segment: the definition, in float64."""
    query, key, value = query.double(), key.double(), value.double()
    out = torch.zeros_like(query)
    rep = query.shape[1] // key.shape[1]
    k_all, v_all = key.repeat_interleave(rep, 1), value.repeat_interleave(rep, 1)
    for seg in layout.segments:
        rows = list(range(seg.prefix_start, seg.prefix_start + seg.prefix_len)) + list(
            range(seg.query_start, seg.query_start + seg.query_len)
        )
        q = query[:, :, seg.query_start : seg.query_start + seg.query_len]
        scores = (q @ k_all[:, :, rows].transpose(-1, -2)) * scaling
        if softcap is not None:
            scores = softcap * torch.tanh(scores / softcap)
        q_pos = torch.arange(seg.prefix_len, seg.prefix_len + seg.query_len).unsqueeze(1)
        k_pos = torch.arange(len(rows)).unsqueeze(0)
        allowed = (k_pos <= q_pos) & ((q_pos - k_pos < window) if window else True)
        weights = scores.masked_fill(~allowed, float("-inf")).softmax(-1)
        out[:, :, seg.query_start : seg.query_start + seg.query_len] = weights @ v_all[:, :, rows]
    return out.transpose(1, 2)


def attention_tolerance(query, key, value, layout, scaling, softcap=None) -> float:
    """A first-order bound of fp32 rounding (u = 2^-24) on the attention output: a score summed over d products is off
    by at most (d + 1) u scaling sum|q_i k_i|; soft-capping (``c tanh(s / c)``, derivative at most 1) passes that on
    and adds its own division, tanh and product (4 u of the score's size); softmax weights then move by at most twice
    the largest score error (relatively) plus (n + 2) u for the exp and the sum over n keys; the output, a weighted
    sum of n values, adds n u; all relative to max|v|."""
    u = FP32_UNIT_ROUNDOFF
    d = query.shape[-1]
    n = max(seg.prefix_len + seg.query_len for seg in layout.segments)
    rep = query.shape[1] // key.shape[1]
    abs_scores = query.abs().double() @ key.abs().double().repeat_interleave(rep, 1).transpose(-1, -2)
    largest_score = scaling * abs_scores.max().item()
    score_error = (d + 1) * u * largest_score
    if softcap is not None:
        score_error += 4 * u * min(largest_score, softcap)
    return (2 * score_error + (2 * n + 2) * u) * value.abs().max().item()


def assert_attention_close(out, query, key, value, layout, scaling, window, softcap=None) -> float:
    """fp32 attention against the float64 definition within :func:`attention_tolerance`; returns the bound."""
    tol = attention_tolerance(query, key, value, layout, scaling, softcap)
    expected = dense_reference(query, key, value, layout, scaling, window, softcap)
    torch.testing.assert_close(out.double(), expected, rtol=0.0, atol=tol)
    return tol
