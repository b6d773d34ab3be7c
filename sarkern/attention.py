"""Exact attention for the packed, shared-prefix forward of :class:`sarkern.SARScorer`.

The scorer packs many sequences into one padding-free row (batch size 1). Per prefix (a prompt, or the placeholder)::

    [ prefix | completion_1[:-1] | completion_2[:-1] | ... ]

The prefix is encoded once; completion ``i`` must attend to the prefix's keys and values and causally to its own, with
positions continuing after the prefix, exactly as if ``[prefix | completion_i]`` had gone through the model alone.
Each such unit of work is an :class:`AttentionSegment`: queries = one contiguous block of packed rows, keys = the
prefix rows (none for a prefix itself) followed by the query rows. In every segment, query ``j`` sits at sequence
position ``prefix_len + j`` and key ``k`` at position ``k``, so the mask is "bottom-right causal" (``k <= prefix_len +
j``), narrowed by a sliding window when the layer has one (``prefix_len + j - k < window``, the convention of
transformers' masks and flash-attn's ``window_size``).

The function is registered with transformers' :class:`~transformers.AttentionInterface` under
:data:`ATTENTION_NAME`. That name has no entry in transformers' mask interface, so the model builds no mask at all
(no dense ``[T, T]`` tensor, no packed-sequence detection from position jumps, which would cut completions off their
prefix); the layout travels to this function as the keyword argument :data:`LAYOUT_KWARG` of the backbone's forward.

Backends:

* ``"flash"`` (CUDA, fp16/bf16, ``flash-attn`` installed): one ``flash_attn_varlen_func`` call per layer; the keys of
  each segment are gathered (the prefix is repeated once per completion in the key buffer, which costs
  ``prefix_len * num_completions`` rows of K and V, not a quadratic mask). flash-attn aligns the causal mask
  bottom-right when queries are fewer than keys, which is the rule above. Attention soft-capping is flash-attn's own
  ``softcap``.
* ``"flex"`` (CUDA by default; CPU when asked, with a C++ compiler): one compiled ``flex_attention`` call per layer
  over the packed row, with a block mask built once per pass from the layout (:func:`sarkern.flex.layout_block_mask`).
  Each query row sees at most two key intervals (its prefix's rows, then its own segment's rows up to itself, both
  narrowed by the window), so the mask is a per-row interval test and its block structure is counted exactly from
  the intervals in ``O(T + (T / block)^2)``. The prefix's keys and values are read in place, once per query block
  that needs them, never copied per completion. The row is padded to a multiple of the block size (its shape bucket;
  padding rows see nothing); compilation is handled in :mod:`sarkern.flex` (one dynamic-length kernel on CUDA, one
  static kernel per bucket on CPU). Attention soft-capping (Gemma 2's ``softcap``) is a ``score_mod``.
* ``"sdpa"`` (everywhere, CPU's default): one ``scaled_dot_product_attention`` call per segment (and per query chunk
  for long ones) with a boolean mask of at most ``chunk_rows x visible_keys`` elements (bounded by
  ``max_mask_elements``), never ``[T, T]``. SDPA has no score modification, so soft-capped layers compute the same
  blocks' scores explicitly (eager attention's arithmetic: scores in the inputs' dtype, softmax in fp32).

``"auto"`` picks flash on CUDA with fp16/bf16 weights when flash-attn is installed, else flex on CUDA when Triton (the
compiler FlexAttention needs there) is available, else sdpa. FlexAttention is not CPU's default: there it needs a C++
toolchain and a compilation per new kernel, while the SDPA path is exact, bounded and immediate.
"""

from __future__ import annotations

import importlib.util
from typing import Any

import torch
import torch.nn.functional as F

from . import flex
from .layout import (
    ATTENTION_BACKENDS,
    DEFAULT_MAX_MASK_ELEMENTS,
    LAYOUT_KWARG,
    AttentionBackend,
    AttentionSegment,
    PackedLayout,
)

__all__ = [
    "ATTENTION_BACKENDS",
    "DEFAULT_MAX_MASK_ELEMENTS",
    "AttentionBackend",
    "ATTENTION_NAME",
    "LAYOUT_KWARG",
    "AttentionBackendError",
    "AttentionSegment",
    "LayoutMissingError",
    "PackedLayout",
    "flash_attn_available",
    "register_attention",
    "shared_prefix_attention",
]

ATTENTION_NAME = "sarkern_shared_prefix"


# Devices whose fused SDPA kernel takes a boolean mask together with grouped (fewer) K/V heads.
_NATIVE_GQA_DEVICES = ("cpu",)



class AttentionBackendError(RuntimeError):
    """The requested attention backend cannot run here (missing package, device, compiler): a property of the
    environment, not of the model."""


class LayoutMissingError(RuntimeError):
    """The shared-prefix attention was called without the packed layout (outside the scorer, or by a model whose
    attention layers do not pass the backbone's keyword arguments on)."""


def flash_attn_available() -> bool:
    """True when the ``flash_attn`` package is importable and CUDA is available."""
    return torch.cuda.is_available() and importlib.util.find_spec("flash_attn") is not None


def _choose_backend(layout: PackedLayout, query: torch.Tensor) -> str:
    flash_ok = query.is_cuda and query.dtype in (torch.float16, torch.bfloat16) and flash_attn_available()
    if layout.backend == "flash":
        if not flash_ok:
            raise AttentionBackendError(
                "attention backend 'flash' needs flash-attn installed, CUDA tensors and fp16/bf16 weights; "
                f"got device={query.device}, dtype={query.dtype}"
            )
        return "flash"
    if layout.backend == "flex":
        reason = flex.flex_unavailable_reason(query.device)
        if reason is not None:
            raise AttentionBackendError(f"attention backend 'flex' cannot run: {reason}; use attention_backend='sdpa'")
        return "flex"
    if layout.backend == "auto":
        if flash_ok:
            return "flash"
        if query.is_cuda and flex.flex_unavailable_reason(query.device) is None:
            return "flex"
    return "sdpa"


def _flash_forward(
    layout: PackedLayout,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float | None,
    sliding_window: int | None,
    softcap: float | None,
) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    key_index, cu_q, cu_k, max_q, max_k = layout.flash_metadata(query.device)
    q = query[0].transpose(0, 1)  # [T, H, D]
    k = key[0].transpose(0, 1).index_select(0, key_index)  # [sum(prefix + own), H_kv, D]
    v = value[0].transpose(0, 1).index_select(0, key_index)
    window = (-1, -1) if sliding_window is None else (sliding_window - 1, 0)
    out = flash_attn_varlen_func(
        q.contiguous(),
        k,
        v,
        cu_q,
        cu_k,
        max_q,
        max_k,
        dropout_p=0.0,
        softmax_scale=scaling,
        causal=True,
        window_size=window,
        softcap=0.0 if softcap is None else softcap,  # flash-attn's "no cap"
    )
    return out.unsqueeze(0)  # [1, T, H, D]


def _segment_keys(tensor: torch.Tensor, seg: AttentionSegment, lo: int, hi: int) -> torch.Tensor:
    """Rows ``[lo, hi)`` of the segment's key sequence (prefix rows then own rows) from ``tensor [1, H, T, D]``."""
    parts = []
    if lo < seg.prefix_len:
        parts.append(tensor[:, :, seg.prefix_start + lo : seg.prefix_start + min(hi, seg.prefix_len)])
    if hi > seg.prefix_len:
        own_lo = max(lo, seg.prefix_len) - seg.prefix_len
        parts.append(tensor[:, :, seg.query_start + own_lo : seg.query_start + hi - seg.prefix_len])
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim=2)


def _softcapped_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scaling: float, softcap: float
) -> torch.Tensor:
    """Attention with soft-capped scores, ``softcap * tanh(scaled score / softcap)``, as transformers' eager attention
    computes it (scores in the inputs' dtype, softmax in fp32); SDPA has no score modification. ``k``/``v`` carry as
    many heads as ``q``; the scores are at most one mask block (``max_mask_elements``) per head."""
    scores = torch.matmul(q, k.transpose(-1, -2)) * scaling
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, float("-inf"))
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    return torch.matmul(weights, v)


def _sdpa_forward(
    layout: PackedLayout,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float | None,
    sliding_window: int | None,
    softcap: float | None = None,
) -> torch.Tensor:
    if scaling is None:
        scaling = query.shape[-1] ** -0.5  # SDPA's default
    group = query.shape[1] // key.shape[1]
    # CPU's fused SDPA kernel takes grouped K/V as is; on other devices, the memory-efficient kernel (the one that
    # accepts a boolean mask) may not, and SDPA would fall back to the math path that materialises all scores. There,
    # K/V are expanded per segment instead (small: one segment's keys).
    native_gqa = group > 1 and query.device.type in _NATIVE_GQA_DEVICES and softcap is None
    expand = group if group > 1 and not native_gqa else 1
    out = query.new_empty(query.shape)
    device = query.device
    for seg in layout.segments:
        n, p = seg.query_len, seg.prefix_len
        if n == 0:
            continue
        rows_per_chunk = max(1, min(n, layout.max_mask_elements // (p + n)))
        for j0 in range(0, n, rows_per_chunk):
            j1 = min(n, j0 + rows_per_chunk)
            # Keys visible to some query of the chunk: positions [lo, hi) of the segment's key sequence.
            hi = p + j1
            lo = 0 if sliding_window is None else max(0, p + j0 - sliding_window + 1)
            q = query[:, :, seg.query_start + j0 : seg.query_start + j1]
            k = _segment_keys(key, seg, lo, hi)
            v = _segment_keys(value, seg, lo, hi)
            if expand > 1:
                k, v = k.repeat_interleave(expand, dim=1), v.repeat_interleave(expand, dim=1)
            if lo == 0 and p + j0 == 0 and sliding_window is None and softcap is None:
                # Square top-left causal block: SDPA's own causal path, no mask.
                mask, is_causal = None, True
            else:
                q_pos = torch.arange(p + j0, p + j1, device=device).unsqueeze(1)
                k_pos = torch.arange(lo, hi, device=device).unsqueeze(0)
                mask = k_pos <= q_pos
                if sliding_window is not None:
                    mask &= q_pos - k_pos < sliding_window
                is_causal = False
            rows = slice(seg.query_start + j0, seg.query_start + j1)
            if softcap is not None:
                out[:, :, rows] = _softcapped_attention(q, k, v, mask, scaling, softcap)
            else:
                out[:, :, rows] = F.scaled_dot_product_attention(
                    q, k, v, attn_mask=mask, is_causal=is_causal, scale=scaling, enable_gqa=native_gqa
                )
    return out.transpose(1, 2)  # [1, T, H, D]


def shared_prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention function in transformers' interface for the packed shared-prefix layout.

    ``query [1, H, T, D]``, ``key``/``value [1, H_kv, T, D]`` (after RoPE); the layout comes in
    ``kwargs[LAYOUT_KWARG]``. Returns ``(output [1, T, H, D], None)``. Soft-capped scores (``softcap``, Gemma 2) are
    applied on every backend. Anything it cannot compute exactly (a mask passed in, dropout, attention sinks,
    non-causal layers) raises instead of being ignored.
    """
    layout = kwargs.get(LAYOUT_KWARG)
    if layout is None:
        raise LayoutMissingError(
            f"the '{ATTENTION_NAME}' attention implementation only runs inside sarkern.SARScorer, which passes the "
            f"packed layout as `{LAYOUT_KWARG}`; set the model's attention implementation back to e.g. 'sdpa'"
        )
    if not isinstance(layout, PackedLayout):
        raise TypeError(f"`{LAYOUT_KWARG}` must be a sarkern.attention.PackedLayout, got {type(layout).__name__}")
    name = type(module).__name__
    if attention_mask is not None:
        raise RuntimeError(f"{name}: the shared-prefix layout defines the mask; got an extra attention_mask")
    if dropout:
        raise RuntimeError(
            f"{name}: attention dropout {dropout} during scoring (the scorer runs the model in eval mode)"
        )
    if not getattr(module, "is_causal", True):
        raise NotImplementedError(f"{name} is not a causal attention layer; SAR scoring needs causal attention")
    for unsupported in ("s_aux", "sinks"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(
                f"{name} uses `{unsupported}`, which the shared-prefix attention does not support"
            )
    if query.shape[0] != 1 or query.shape[2] != layout.total_len or key.shape[2] != layout.total_len:
        raise RuntimeError(
            f"{name}: expected one packed row of {layout.total_len} tokens, got query {tuple(query.shape)} "
            f"and key {tuple(key.shape)} (is a KV cache in use?)"
        )
    if sliding_window is not None and sliding_window <= 0:
        raise ValueError(f"{name}: sliding_window must be positive, got {sliding_window}")
    softcap = kwargs.get("softcap")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"{name}: softcap must be positive, got {softcap}")
    backend = _choose_backend(layout, query)
    layout.calls += 1
    if backend == "flex":
        block_mask = flex.layout_block_mask(layout, query.device, sliding_window)
        try:
            return flex.flex_forward(block_mask, query, key, value, scaling, softcap), None
        except RuntimeError as err:  # compilation failed or too many compiled variants
            raise AttentionBackendError(str(err)) from err
    if backend == "flash":
        return _flash_forward(layout, query, key, value, scaling, sliding_window, softcap), None
    return _sdpa_forward(layout, query, key, value, scaling, sliding_window, softcap), None


def register_attention() -> str:
    """Register :func:`shared_prefix_attention` with transformers (idempotent) and return its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    # The whole point of a separate name: transformers must not build a mask for it.
    if ATTENTION_NAME in ALL_MASK_ATTENTION_FUNCTIONS:
        raise RuntimeError(f"a mask function is registered for '{ATTENTION_NAME}'; it must not be")
    AttentionInterface.register(ATTENTION_NAME, shared_prefix_attention)
    return ATTENTION_NAME
