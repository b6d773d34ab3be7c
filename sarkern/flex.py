"""FlexAttention over the packed shared-prefix row: the ``"flex"`` backend of :mod:`sarkern.attention`.

Every query row of a :class:`~sarkern.attention.PackedLayout` sees at most two contiguous ranges of key rows: its
prefix's rows (those within the sliding window) and its own segment's rows up to itself (within the window). When a
segment directly follows its prefix the two ranges touch and are merged into one. The mask is therefore a per-row
interval test, ``lo1 <= k < hi1 or lo2 <= k < hi2``, and the block structure FlexAttention needs (which key blocks
each query block must visit, and which of them are entirely visible) follows exactly from the intervals, without ever
evaluating a ``[T, T]`` mask.

The row is padded to a multiple of the block size (its shape bucket); padding rows see no key and no row sees them,
so their query blocks cost nothing. On CUDA the kernel is ``torch.compile(flex_attention, dynamic=True)``: one
compiled kernel serves every bucket (after at most one re-specialisation of the very first shape), so GRPO steps whose
packed lengths differ do not recompile. On CPU, where Inductor's FlexAttention template miscompiles dynamic shapes
(torch 2.13: undeclared split-size variables in the generated C++), each bucket is compiled once, statically. Either
way the number of compiled variants is capped (:data:`MAX_COMPILED_VARIANTS`) and exceeding it raises instead of
falling back to uncompiled FlexAttention, which would materialise every score.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:
    from torch.nn.attention.flex_attention import BlockMask

    from .layout import AttentionSegment, PackedLayout

# FlexAttention's own default tile (and the granularity of the shape buckets).
BLOCK_SIZE = 128

# Compiled FlexAttention variants allowed before refusing (dynamo's default limit of 8 would silently fall back to the
# unfused, score-materialising implementation): shape buckets on CPU, score/mask variants everywhere.
MAX_COMPILED_VARIANTS = 64


def bucket_length(total_len: int, block_size: int = BLOCK_SIZE) -> int:
    """The padded length of a packed row: the next multiple of the block size (at least one block)."""
    return max(1, -(-total_len // block_size)) * block_size


def row_intervals(
    segments: Sequence[AttentionSegment], total_len: int, padded_len: int, window: int | None
) -> torch.Tensor:
    """``[4, padded_len]`` int64 ``(lo1, hi1, lo2, hi2)``: packed row ``r`` sees keys ``[lo1, hi1) U [lo2, hi2)``.

    In a segment, query ``j`` sits at position ``prefix_len + j``; prefix row ``i`` at position ``i`` and own row
    ``i`` at ``prefix_len + i``. The window keeps key positions ``> position - window``. Empty ranges are ``lo == hi``.
    """
    bounds = torch.zeros(4, padded_len, dtype=torch.long)
    for seg in segments:
        n, p = seg.query_len, seg.prefix_len
        if n == 0:
            continue
        j = torch.arange(n)
        rows = slice(seg.query_start, seg.query_start + n)
        skip_prefix = torch.zeros(n, dtype=torch.long) if window is None else (p + j - window + 1).clamp(min=0, max=p)
        skip_own = torch.zeros(n, dtype=torch.long) if window is None else (j - window + 1).clamp(min=0)
        bounds[0, rows] = seg.prefix_start + skip_prefix
        bounds[1, rows] = seg.prefix_start + p
        bounds[2, rows] = seg.query_start + skip_own
        bounds[3, rows] = seg.query_start + j + 1
    bounds[:, total_len:] = total_len  # padding rows see nothing (their output is discarded): no work for them
    # Touching ranges (a segment right after its prefix, no window cut between them) become one range, so that a key
    # block straddling the two counts as entirely visible.
    touching = (bounds[1] == bounds[2]) & (bounds[0] < bounds[1])
    bounds[1] = torch.where(touching, bounds[3], bounds[1])
    bounds[2] = torch.where(touching, bounds[3], bounds[2])
    return bounds


def _interval_mask_mod(bounds: torch.Tensor) -> Callable:
    """FlexAttention ``mask_mod`` of the intervals (one function body for every layout: no recompilation)."""
    # Separate tensors, not views into ``bounds``: Inductor's CPU template miscompiles captured views with an offset.
    lo1, hi1, lo2, hi2 = (row.clone() for row in bounds.unbind(0))

    def mask_mod(b, h, q_idx, kv_idx):
        return ((kv_idx >= lo1[q_idx]) & (kv_idx < hi1[q_idx])) | ((kv_idx >= lo2[q_idx]) & (kv_idx < hi2[q_idx]))

    return mask_mod


def block_structure(bounds: torch.Tensor, block_size: int = BLOCK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """``(partial, full)`` bool ``[q_blocks, kv_blocks]``: key blocks some (not all) / all pairs of which are visible
    from a query block, counted from the row intervals in ``O(rows + blocks^2)``.

    A range ``[lo, hi)`` touches key blocks ``[lo // B, ceil(hi / B))`` and covers ``[ceil(lo / B), hi // B)``; per
    query block, difference arrays count how many rows touch / cover each key block. A block is full when all its
    ``B`` rows cover it (a row's two ranges neither overlap nor touch, so no block is covered twice by one row).
    """
    padded_len = bounds.shape[1]
    blocks = padded_len // block_size
    q_block = torch.arange(padded_len, device=bounds.device) // block_size
    touch = torch.zeros(blocks, blocks + 1, dtype=torch.int32, device=bounds.device)
    cover = torch.zeros_like(touch)
    for lo, hi in ((bounds[0], bounds[1]), (bounds[2], bounds[3])):
        for counts, first, end in (
            (touch, lo // block_size, -(-hi // block_size)),
            (cover, -(-lo // block_size), hi // block_size),
        ):
            step = ((lo < hi) & (first < end)).to(torch.int32)
            counts.index_put_((q_block, first), step, accumulate=True)
            counts.index_put_((q_block, end), -step, accumulate=True)
    touched = touch.cumsum(1)[:, :blocks] > 0
    full = cover.cumsum(1)[:, :blocks] == block_size
    return touched & ~full, full


def _kv_block_lists(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """BlockMask's per-query-block count and indices (selected blocks first) of a bool ``[q_blocks, kv_blocks]``."""
    counts = blocks.sum(-1, dtype=torch.int32)
    indices = torch.argsort(blocks.to(torch.int8), dim=-1, descending=True, stable=True).to(torch.int32)
    return counts[None, None], indices[None, None]


def build_block_mask(
    segments: Sequence[AttentionSegment],
    total_len: int,
    window: int | None,
    device: torch.device,
    block_size: int = BLOCK_SIZE,
) -> BlockMask:
    """The FlexAttention block mask of a packed layout over its padded length (:func:`bucket_length`)."""
    from torch.nn.attention.flex_attention import BlockMask

    padded_len = bucket_length(total_len, block_size)
    bounds = row_intervals(segments, total_len, padded_len, window).to(device)
    partial, full = block_structure(bounds, block_size)
    kv_num_blocks, kv_indices = _kv_block_lists(partial)
    full_num_blocks, full_indices = _kv_block_lists(full)
    return BlockMask.from_kv_blocks(
        kv_num_blocks,
        kv_indices,
        full_num_blocks,
        full_indices,
        BLOCK_SIZE=block_size,
        mask_mod=_interval_mask_mod(bounds),
        seq_lengths=(padded_len, padded_len),
    )


def softcap_score_mod(softcap: float, device: torch.device) -> Callable:
    """Attention soft-capping as transformers' eager attention applies it: ``softcap * tanh(score / softcap)`` on the
    scaled scores (Gemma 2's ``attn_logit_softcapping``)."""
    # A 0-d tensor rather than a Python float, which a dynamic-shape compilation would turn into a symbolic input
    # that Inductor's FlexAttention lowering cannot take.
    cap = torch.tensor(float(softcap), dtype=torch.float32, device=device)

    def score_mod(score, b, h, q_idx, kv_idx):
        return cap * torch.tanh(score / cap)

    return score_mod


@functools.cache
def flex_unavailable_reason(device: torch.device) -> str | None:
    """Why compiled FlexAttention cannot run on ``device`` here (None when it can); checked once per device."""
    try:
        import torch.nn.attention.flex_attention  # noqa: F401
    except ImportError as err:
        return f"this torch ({torch.__version__}) has no FlexAttention ({err})"
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile (dynamo) is not supported on this Python/platform"
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "torch.compile needs Triton for CUDA tensors and Triton is not installed"
    if device.type == "cpu":
        # Inductor's C++ FlexAttention template is not trusted for scoring: in torch 2.13 it miscompiles dynamic
        # shapes, and with AVX2 code generation (ATEN_CPU_CAPABILITY=avx2 on an AVX-512 machine) its output was
        # off by O(1) in this project's tests. The per-segment SDPA path is exact on CPU.
        return (
            "compiled FlexAttention on CPU tensors (Inductor's C++ template) gave wrong outputs in sarkern's tests "
            "with AVX2 code generation; the flex backend runs on CUDA only"
        )
    return f"FlexAttention is not supported on {device.type} tensors"


@functools.cache
def compiled_flex_attention(dynamic: bool) -> Callable:
    """``flex_attention`` compiled with a dynamic sequence length, or per shape (shared by every layer)."""
    from torch.nn.attention.flex_attention import flex_attention

    return torch.compile(flex_attention, dynamic=dynamic)


def flex_kernel(device: torch.device) -> Callable:
    """The FlexAttention callable the backend runs on ``device`` (tests swap in the uncompiled one at tiny shapes)."""
    return compiled_flex_attention(dynamic=device.type != "cpu")


def flex_forward(
    block_mask: BlockMask,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float | None,
    softcap: float | None,
) -> torch.Tensor:
    """``query [1, H, T, D]``, ``key``/``value [1, H_kv, T, D]`` -> ``[1, T, H, D]``: one FlexAttention call."""
    total_len = query.shape[2]
    pad = block_mask.seq_lengths[0] - total_len
    if pad:
        query, key, value = (F.pad(x, (0, 0, 0, pad)) for x in (query, key, value))
    score_mod = None if softcap is None else softcap_score_mod(softcap, query.device)
    kernel = flex_kernel(query.device)
    try:
        with torch._dynamo.config.patch(recompile_limit=MAX_COMPILED_VARIANTS, fail_on_recompile_limit_hit=True):
            out = kernel(
                query,
                key,
                value,
                score_mod=score_mod,
                block_mask=block_mask,
                scale=scaling,
                enable_gqa=query.shape[1] != key.shape[1],
            )
    except torch._dynamo.exc.FailOnRecompileLimitHit as err:
        raise RuntimeError(
            f"FlexAttention was compiled for {MAX_COMPILED_VARIANTS} shapes or variants already; refusing to fall "
            "back to its uncompiled, score-materialising implementation"
        ) from err
    except torch._dynamo.exc.TorchDynamoException as err:
        raise RuntimeError(
            f"compiling FlexAttention for the 'flex' attention backend failed on {query.device.type} "
            f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}); "
            "use attention_backend='sdpa' (or 'flash' on CUDA with flash-attn)"
        ) from err
    return out[:, :, :total_len].transpose(1, 2)


def layout_block_mask(layout: PackedLayout, device: torch.device, window: int | None) -> BlockMask:
    """The block mask of ``layout`` for layers with this sliding window (None: full attention), built once per
    layout, device and window and cached on the layout."""
    key = ("flex", device, window)
    if key not in layout.backend_cache:
        layout.backend_cache[key] = build_block_mask(layout.segments, layout.total_len, window, device)
    return layout.backend_cache[key]
