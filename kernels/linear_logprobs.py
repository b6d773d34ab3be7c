"""Log-probs of target tokens from hidden states and the LM-head weight, never writing `[N, V]` logits: the forward.

Two kernels:
1. `_partial_kernel`: one program per (token block, vocabulary split). It computes logit tiles
   `[BLOCK_N, BLOCK_V] = hidden @ weight.T` with fp32 accumulation over D for the vocabulary tiles of its split,
   and folds them into an online log-sum-exp in log2 units (`x = logit / T * log2(e)`, so every exponential is a
   bare exp2): running max `m`, `s = sum 2^(x - m)`, `t = sum 2^(x - m)(x - m)`, and the target's logit taken from
   the same accumulator by an int32 compare against the tile's own column numbers. Each split writes four fp32
   values per token.
2. `_combine_kernel`: merges the splits of each token into `lse`, the log-prob and the entropy (natural units), and,
   for `sequence_perplexity`, adds each log-prob and a count of one into its segment's slot.

Program order (why the split is the fastest grid axis): a program re-reads its `[BLOCK_N, D]` hidden block for every
vocabulary tile. With the token block fastest, the ~130 programs resident on an H100 each hold a different hidden
block (~130 MiB at D = 4096, bf16), far more than the 50 MB L2, so hidden rows come from HBM again and again. With
the split fastest and about sqrt(resident programs) splits, the resident programs cover ~11 token blocks x ~12
splits: ~11 MiB of hidden rows and ~12 weight tiles at a time, which stay in L2.

The backward is in `linear_logprobs_grad.py`; the logit tile both share is `_logits_tile` here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from ._common import (
    LN2,
    LOG2E,
    Blocks,
    KernelSpec,
    arch_family,
    compiled_programs_per_sm,
    env_switch,
    gemm_constexprs,
    gemm_kernel_spec,
    gemm_operand,
    interpreting,
    on_operand_device,
    soft_cap,
    tma_loads,
)
from .linear_logprobs_tiles import FLATTEN_VARIABLE, FORWARD_CANDIDATES_16, forward_blocks

# `_combine_kernel` holds every split of its tokens at once: a [BLOCK_S, BLOCK_N] tile of at most COMBINE_ELEMENTS
# values (16 per thread at 4 warps: no spills), so BLOCK_N shrinks as the splits grow, up to MAX_SPLITS.
COMBINE_BLOCK = 128
COMBINE_ELEMENTS = 2048
MAX_SPLITS = 128


@triton.jit
def _logits_tile(
    hidden,
    weight,
    bias_ptr,
    row0,
    col0,
    n_tokens,
    vocab,
    dim,
    stride_hn,
    stride_wv,
    logit_scale,
    softcap,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    TMA: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """fp32 `(hidden[rows] @ weight[cols].T + bias[cols]) * logit_scale` for the tile's `BLOCK_N` rows from `row0`
    and `BLOCK_V` columns from `col0`, soft-capped before the scaling with SOFTCAP, and -inf in the columns past the
    vocabulary. Pointer offsets are int64, so addresses never wrap. With TMA, `hidden` and `weight` are tensor
    descriptors (`_common.tma_loads`) that zero-fill past the edges, as the masks do; otherwise they are pointers."""
    rows = row0.to(tl.int64) + tl.arange(0, BLOCK_N)
    cols = (col0 + tl.arange(0, BLOCK_V)).to(tl.int64)
    row_mask = rows < n_tokens
    col_mask = cols < vocab
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for d_start in range(0, dim, BLOCK_D):
        if TMA:
            h = hidden.load([row0, d_start])
            w = weight.load([col0, d_start])
        else:
            ds = d_start + tl.arange(0, BLOCK_D)
            d_mask = ds < dim
            h = tl.load(
                hidden + rows[:, None] * stride_hn + ds[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0
            )
            w = tl.load(
                weight + cols[:, None] * stride_wv + ds[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0
            )
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        acc = soft_cap(acc, softcap)
    return tl.where(col_mask[None, :], acc * logit_scale, float("-inf"))


# The partial sums' pointers and the split counts vary with the split count, which the launch plan derives from the
# compiled kernel (`plan_forward`): not specializing on them makes the plan's warm-up compile the kernel the launch
# then runs.
@triton.jit(
    do_not_specialize=["num_splits", "tiles_per_split"],
    do_not_specialize_on_alignment=["part_max_ptr", "part_sum_ptr", "part_t_ptr", "part_target_ptr"],
)
def _partial_kernel(
    hidden,
    weight,
    bias_ptr,
    targets_ptr,
    part_max_ptr,
    part_sum_ptr,
    part_t_ptr,
    part_target_ptr,
    n_tokens,
    vocab,
    dim,
    stride_hn,
    stride_wv,
    logit_scale,
    softcap,
    num_splits,
    tiles_per_split,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    RETURN_ENTROPY: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    TMA: tl.constexpr,
    FLATTEN: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    split = pid % num_splits  # fastest: the programs resident together share their hidden blocks (module docstring)
    row0 = (pid // num_splits) * BLOCK_N
    rows = row0.to(tl.int64) + tl.arange(0, BLOCK_N)
    row_mask = rows < n_tokens
    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, vocab)
    # The target as an int32 column of this split (-1: not in it), compared with each tile's int32 column numbers.
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1)
    in_split = (targets >= v_begin) & (targets < v_end)
    target_col = tl.where(in_split, targets - v_begin, -1).to(tl.int32)
    tile_cols = tl.arange(0, BLOCK_V)

    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    target_x = tl.zeros((BLOCK_N,), tl.float32)
    # FLATTEN: one software-pipelined loop over (tile, K step), so that the next tile's first loads are in flight
    # during this tile's softmax epilogue (a candidate, `gpu_candidates`).
    for v_start in tl.range(v_begin, v_end, BLOCK_V, flatten=FLATTEN):
        x = _logits_tile(
            hidden,
            weight,
            bias_ptr,
            row0,
            v_start,
            n_tokens,
            vocab,
            dim,
            stride_hn,
            stride_wv,
            logit_scale,
            softcap,
            HAS_BIAS,
            SOFTCAP,
            UPCAST,
            PRECISION,
            TMA,
            BLOCK_N,
            BLOCK_V,
            BLOCK_D,
        )
        target_x += tl.sum(tl.where(tile_cols[None, :] == (target_col - (v_start - v_begin))[:, None], x, 0.0), 1)
        m_new = tl.maximum(m, tl.max(x, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)  # all -inf so far: shift by 0, never NaN
        scale = tl.exp2(m - shift)
        e = tl.exp2(x - shift[:, None])
        if RETURN_ENTROPY:
            t = scale * (t + tl.where(s > 0, s * (m - shift), 0.0))
            t += tl.sum(tl.where(e > 0, e * (x - shift[:, None]), 0.0), 1)
        s = s * scale + tl.sum(e, 1)
        m = m_new

    out = split.to(tl.int64) * n_tokens + rows
    tl.store(part_max_ptr + out, m, mask=row_mask)
    tl.store(part_sum_ptr + out, s, mask=row_mask)
    tl.store(part_target_ptr + out, target_x, mask=row_mask)
    if RETURN_ENTROPY:
        tl.store(part_t_ptr + out, t, mask=row_mask)


@triton.jit
def _combine_kernel(
    part_max_ptr,
    part_sum_ptr,
    part_t_ptr,
    part_target_ptr,
    targets_ptr,
    logprobs_ptr,
    entropy_ptr,
    lse_ptr,
    segment_ids_ptr,
    segment_sums_ptr,
    segment_counts_ptr,
    n_tokens,
    vocab,
    num_splits,
    num_segments,
    ignore_index,
    RETURN_ENTROPY: tl.constexpr,
    HAS_SEGMENTS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_tokens
    splits = tl.arange(0, BLOCK_S)
    offsets = splits[:, None].to(tl.int64) * n_tokens + rows[None, :]
    mask = (splits[:, None] < num_splits) & row_mask[None, :]
    m = tl.load(part_max_ptr + offsets, mask=mask, other=float("-inf"))
    s = tl.load(part_sum_ptr + offsets, mask=mask, other=0.0)
    target_x = tl.sum(tl.load(part_target_ptr + offsets, mask=mask, other=0.0), 0)

    big_m = tl.max(m, 0)
    shift = tl.where(big_m == float("-inf"), 0.0, big_m)
    weight = tl.where(s > 0, tl.exp2(m - shift[None, :]), 0.0)
    total = tl.sum(s * weight, 0)
    log_total = tl.log2(total)
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=ignore_index)
    valid = targets != ignore_index
    # (x - max) - log sum, not x - lse: lse is only as fine as the spacing of fp32 at the max logit.
    logprobs = ((target_x - shift) - log_total) * LN2
    # A target id outside the vocabulary (possible when the caller skipped the id check) gives NaN, never a value.
    logprobs = tl.where(valid, tl.where((targets < 0) | (targets >= vocab), float("nan"), logprobs), 0.0)
    tl.store(lse_ptr + rows, (shift + log_total) * LN2, mask=row_mask)
    tl.store(logprobs_ptr + rows, logprobs, mask=row_mask)
    if RETURN_ENTROPY:
        t = tl.load(part_t_ptr + offsets, mask=mask, other=0.0)
        # Each split's t is relative to its own max; move it to the common shift before summing.
        t_total = tl.sum(tl.where(s > 0, (t + s * (m - shift[None, :])) * weight, 0.0), 0)
        tl.store(entropy_ptr + rows, tl.where(valid, (log_total - t_total / total) * LN2, 0.0), mask=row_mask)
    if HAS_SEGMENTS:
        segments = tl.load(segment_ids_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
        # Ids past the last segment are dropped, never written out of bounds (callers may skip the id check).
        counted = row_mask & (segments >= 0) & (segments < num_segments) & valid
        tl.atomic_add(segment_sums_ptr + segments, logprobs, mask=counted)
        tl.atomic_add(segment_counts_ptr + segments, tl.where(counted, 1.0, 0.0), mask=counted)


# Programs per SM of each compiled forward variant, keyed by device and variant: measured once from the compiled
# kernel, since the register count behind it depends on the Triton version as much as on the tile.
_PROGRAMS_PER_SM: dict[tuple, int] = {}


def resident_programs(device: torch.device, variant: tuple, compile_variant) -> int:
    """Programs of the forward resident at once: SMs x how many programs of the compiled kernel fit on one SM
    (`compile_variant()` compiles it without launching, the first time `variant` runs on `device`)."""
    if device.type != "cuda":
        return 2
    key = (device.index, variant)
    if key not in _PROGRAMS_PER_SM:
        _PROGRAMS_PER_SM[key] = compiled_programs_per_sm(compile_variant(), device)
    return torch.cuda.get_device_properties(device).multi_processor_count * _PROGRAMS_PER_SM[key]


def num_splits(n_blocks: int, n_vocab_tiles: int, resident: int) -> int:
    """Vocabulary splits: about sqrt(resident) of them, so that the resident programs span as many token blocks as
    splits (the smallest L2 working set, module docstring), and more when there are few token blocks, so that at
    least two waves of programs cover the SMs; never more than the vocabulary tiles or MAX_SPLITS (one token block
    then runs as 128 programs, about one wave)."""
    group = math.isqrt(max(1, resident - 1)) + 1
    return max(1, min(n_vocab_tiles, max(group, triton.cdiv(2 * resident, n_blocks)), MAX_SPLITS))


def combine_tile(splits: int) -> tuple[int, int]:
    """(BLOCK_S, BLOCK_N) of `_combine_kernel` for `splits` vocabulary splits (16 tokens per program interpreted)."""
    block_s = triton.next_power_of_2(splits)
    if interpreting():
        return block_s, 16
    return block_s, max(16, min(COMBINE_BLOCK, COMBINE_ELEMENTS // block_s))


@dataclass(frozen=True)
class ForwardPlan:
    """How `_partial_kernel` launches for given operands (`make gpu-check` reports it beside the times)."""

    blocks: Blocks
    constexprs: dict
    resident: int  # programs resident at once (SMs x programs per SM of the compiled kernel; 2 interpreted)
    splits: int
    tiles_per_split: int

    @property
    def tma(self) -> bool:
        return self.constexprs["TMA"]

    def describe(self) -> str:
        b = self.blocks
        loads = "TMA" if self.tma else "pointer loads"
        flat = ", flattened loop" if self.constexprs["FLATTEN"] else ""
        return (
            f"{b.block_n}x{b.block_v}x{b.block_d} w{b.num_warps} s{b.num_stages}, {loads}{flat}, "
            f"{self.resident} resident programs, {self.splits} vocabulary splits of {self.tiles_per_split} tiles"
        )


def _arguments(blocks, tma, hidden, weight, bias, targets, partials, temperature, softcap, splits, tiles_per_split):
    """`_partial_kernel`'s positional arguments."""
    n_tokens, dim = hidden.shape
    return (
        gemm_operand(hidden, blocks.block_n, blocks.block_d, tma),
        gemm_operand(weight, blocks.block_v, blocks.block_d, tma),
        bias if bias is not None else hidden,
        targets,
        *partials,
        n_tokens,
        weight.shape[0],
        dim,
        hidden.stride(0),
        weight.stride(0),
        LOG2E.value / temperature,
        softcap or 1.0,
        splits,
        tiles_per_split,
    )


def plan_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    *,
    return_entropy: bool,
    softcap: float = 0.0,
    splits: int | None = None,
) -> ForwardPlan:
    """Tiles, operand loads and vocabulary splits of the forward for `hidden [N, D]` and `weight [V, D]`; on a GPU
    the first plan of each variant compiles (without launching) the kernel the launch will run, to count how many
    of its programs fit on an SM."""
    n_tokens = hidden.shape[0]
    device = hidden.device
    arch = 0 if interpreting() else arch_family(device)
    tma = tma_loads(arch, hidden, weight)
    blocks = forward_blocks(hidden.dtype, arch, bool(softcap), tma)
    constexprs = dict(
        HAS_BIAS=bias is not None,
        SOFTCAP=bool(softcap),
        RETURN_ENTROPY=return_entropy,
        FLATTEN=bool(env_switch(FLATTEN_VARIABLE, "one flattened loop over tiles and K steps")),
        **gemm_constexprs(hidden.dtype, blocks, tma),
    )

    def compile_variant():
        partials = torch.empty((4, 1), dtype=torch.float32, device=device)
        arguments = _arguments(blocks, tma, hidden, weight, bias, targets, partials, 1.0, softcap, 2, 2)
        return _partial_kernel.warmup(*arguments, grid=(1,), **constexprs, **_launch_options(blocks))

    resident = resident_programs(device, (hidden.dtype, blocks, tuple(constexprs.items())), compile_variant)
    n_blocks = max(1, triton.cdiv(n_tokens, blocks.block_n))
    n_vocab_tiles = triton.cdiv(weight.shape[0], blocks.block_v)
    splits = max(1, min(splits or num_splits(n_blocks, n_vocab_tiles, resident), n_vocab_tiles))
    tiles_per_split = triton.cdiv(n_vocab_tiles, splits)
    return ForwardPlan(blocks, constexprs, resident, triton.cdiv(n_vocab_tiles, tiles_per_split), tiles_per_split)


def _launch_options(blocks: Blocks) -> dict:
    return dict(num_warps=blocks.num_warps, num_stages=blocks.num_stages)


@on_operand_device
def linear_logprobs_forward(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int,
    return_entropy: bool,
    segment_ids: torch.Tensor | None = None,
    num_segments: int = 0,
    softcap: float = 0.0,
    splits: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """Per-token fp32 (logprobs, entropy or empty, lse, segment_sums, segment_counts) for `hidden [N, D]`.

    `hidden` and `weight` must have a contiguous last dim. Tokens whose target is `ignore_index` get log-prob 0
    and are left out of their segment. Segment sums and counts are empty unless `segment_ids` is given. `softcap`
    0 means none; `splits` overrides the number of vocabulary splits (tests).
    """
    n_tokens = hidden.shape[0]
    vocab = weight.shape[0]
    f32 = dict(dtype=torch.float32, device=hidden.device)
    logprobs = torch.empty(n_tokens, **f32)
    lse = torch.empty(n_tokens, **f32)
    entropy = torch.empty(n_tokens, **f32) if return_entropy else logprobs.new_empty(0)
    has_segments = segment_ids is not None
    segment_sums = torch.zeros(num_segments if has_segments else 0, **f32)
    segment_counts = torch.zeros_like(segment_sums)
    if n_tokens == 0:
        return logprobs, entropy, lse, segment_sums, segment_counts

    plan = plan_forward(hidden, weight, bias, targets, return_entropy=return_entropy, softcap=softcap, splits=splits)
    partials = torch.empty((4, plan.splits, n_tokens), **f32)
    n_blocks = triton.cdiv(n_tokens, plan.blocks.block_n)
    _partial_kernel[(n_blocks * plan.splits,)](
        *_arguments(
            plan.blocks,
            plan.tma,
            hidden,
            weight,
            bias,
            targets,
            partials,
            temperature,
            softcap,
            plan.splits,
            plan.tiles_per_split,
        ),
        **plan.constexprs,
        **_launch_options(plan.blocks),
    )
    block_s, combine_block = combine_tile(plan.splits)
    _combine_kernel[(triton.cdiv(n_tokens, combine_block),)](
        partials[0],
        partials[1],
        partials[2],
        partials[3],
        targets,
        logprobs,
        entropy,
        lse,
        segment_ids if has_segments else targets,
        segment_sums,
        segment_counts,
        n_tokens,
        vocab,
        plan.splits,
        num_segments,
        ignore_index,
        RETURN_ENTROPY=return_entropy,
        HAS_SEGMENTS=has_segments,
        BLOCK_N=combine_block,
        BLOCK_S=block_s,
        num_warps=1 if interpreting() else 4,
    )
    return logprobs, entropy, lse, segment_sums, segment_counts


# ------------------------------------------------------------------------------------- ahead-of-time compile check


def compile_specs(arch: int) -> list[KernelSpec]:
    """Every forward configuration the launcher can choose on `arch`: per operand dtype, the plain tiles with and
    without entropy and bias and the soft-capped tiles with everything on; on sm_90, 16-bit ones with TMA descriptor
    loads (the default) and with pointer loads (unaligned operands, `SARKERN_TMA=0`), and the candidates with TMA
    (as `make gpu-check` times them)."""
    specs = []
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for tma in (True, False) if arch >= 90 and dtype != torch.float32 else (False,):
            variants = [
                ("plain", forward_blocks(dtype, arch), False, False, False),
                ("entropy+bias", forward_blocks(dtype, arch), True, False, False),
                ("entropy+bias+softcap", forward_blocks(dtype, arch, softcap=True, tma=tma), True, True, False),
            ]
            if tma and dtype == torch.bfloat16:
                variants += [
                    (f"entropy+bias, candidate {i}", b, True, False, False) for i, b in enumerate(FORWARD_CANDIDATES_16)
                ]
                variants += [("entropy+bias, flattened", forward_blocks(dtype, arch), True, False, True)]
            for label, blocks, entropy, softcap, flatten in variants:
                constexprs = dict(HAS_BIAS=entropy, SOFTCAP=softcap, RETURN_ENTROPY=entropy, FLATTEN=flatten)
                specs.append(
                    gemm_kernel_spec(
                        _partial_kernel, label, dtype, blocks, tma, constexprs, ctas_per_sm=blocks.ctas_per_sm
                    )
                )
    for segments, splits in ((True, 16), (False, 16), (True, MAX_SPLITS)):
        block_s, block_n = combine_tile(splits)
        specs.append(
            KernelSpec(
                name=f"_combine_kernel[{'segments, ' if segments else ''}entropy, {block_s}x{block_n}]",
                kernel=_combine_kernel,
                constexprs=dict(RETURN_ENTROPY=True, HAS_SEGMENTS=segments, BLOCK_N=block_n, BLOCK_S=block_s),
                num_warps=4,
                num_stages=1,
                pointers=dict(targets_ptr="i64", segment_ids_ptr="i64"),
            )
        )
    return specs
