"""Gradients of `linear_token_logprobs` and `sequence_perplexity` with respect to hidden, weight and bias.

`_grad_logits_kernel` recomputes one `[tokens, vocab]` tile of logits (`_logits_tile`, in the forward's log2 units)
and writes `d loss / d logits` for it in the input dtype; the launcher turns each tile into the gradients of hidden,
weight and bias with two tensor-core GEMMs, so memory stays bounded by one tile.

Accumulation: the hidden-state gradient of a token chunk accumulates in fp32 over every vocabulary tile, each tile's
product leaving cuBLAS in fp32 (`_add_product_fp32`), never rounded to the operands' 16 bits; the weight gradient
accumulates in its own dtype across token chunks (rounded once per chunk: 16 times at N = 16384). Exact
fp32 accumulation of both would need either an fp32 `[V, D]` (2.5 GB at V = 151936, D = 4096) or an fp32 `[N, D]`
buffer (256 MiB at N = 16384) across the whole loop, both far beyond DESIGN.md's 64 MiB, or a fourth GEMM
(recomputing the logits once per loop order), which would break the 1.45x forward + backward target.
"""

from __future__ import annotations

import itertools

import torch
import triton
import triton.language as tl

from ._common import (
    LN2,
    LOG2E,
    TL_TYPE_NAMES,
    Blocks,
    KernelSpec,
    arch_family,
    gemm_constexprs,
    gemm_kernel_spec,
    gemm_operand,
    interpreting,
    on_operand_device,
    soft_cap,
    soft_cap_slope,
    tma_loads,
)
from .linear_logprobs import _logits_tile, forward_blocks

# The gradient tile's configurations, from the ahead-of-time compile report: the plain tile (log-prob gradient only)
# as the forward's; with the entropy gradient or soft-capping, the epilogue holds p, log p, the entropy term or the
# cap's slope on top of the accumulator, and a [128, 128] tile spills on sm_90a, so those take half the rows.
GRAD_BLOCKS = {
    (90, 16): Blocks(128, 128, 64, num_warps=8, num_stages=3),
    (80, 16): Blocks(128, 128, 64, num_warps=8, num_stages=3),
    (90, 32): Blocks(64, 64, 32, num_warps=4, num_stages=3),
    (80, 32): Blocks(64, 64, 32, num_warps=4, num_stages=3),
}
HEAVY_GRAD_BLOCKS_16 = Blocks(64, 128, 64, num_warps=8, num_stages=3)
# Backward tiles: a [1024, 8192] bf16 tile of logit gradients is 16 MiB, its fp32 hidden accumulator 16 MiB at D=4096.
BACKWARD_TILE = (1024, 8192)


def grad_blocks(dtype: torch.dtype, arch: int, heavy: bool = False) -> Blocks:
    """Tiles of `_grad_logits_kernel`; `heavy`: with the entropy gradient or soft-capping."""
    if arch == 0:
        return forward_blocks(dtype, 0)
    width = 32 if dtype == torch.float32 else 16
    if heavy and width == 16:
        return HEAVY_GRAD_BLOCKS_16
    return GRAD_BLOCKS[(90 if arch >= 90 else 80, width)]


@triton.jit
def _grad_logits_kernel(
    grad_logits_ptr,
    hidden,
    weight,
    bias_ptr,
    targets_ptr,
    lse_ptr,
    entropy_ptr,
    grad_logprobs_ptr,
    grad_entropy_ptr,
    n_tokens,
    vocab,
    dim,
    stride_hn,
    stride_wv,
    stride_gn,
    col_offset,
    logit_scale,
    inv_temperature,
    softcap,
    ignore_index,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    TMA: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    row0 = tl.program_id(0) * BLOCK_N
    rows = row0.to(tl.int64) + tl.arange(0, BLOCK_N)
    tile_start = tl.program_id(1) * BLOCK_V
    tile_cols = tl.arange(0, BLOCK_V)
    cols = tile_start.to(tl.int64) + tile_cols
    row_mask = rows < n_tokens
    # x in log2 units: x = logit / T * log2(e), as in the forward. With SOFTCAP the tile comes uncapped and unscaled
    # and is capped here, as `_logits_tile` does it: the cap's slope needs the raw logits.
    tile_scale = logit_scale
    if SOFTCAP:
        tile_scale = 1.0
    x = _logits_tile(
        hidden,
        weight,
        bias_ptr,
        row0,
        tile_start,
        n_tokens,
        vocab,
        dim,
        stride_hn,
        stride_wv,
        tile_scale,
        softcap,
        HAS_BIAS,
        False,
        UPCAST,
        PRECISION,
        TMA,
        BLOCK_N,
        BLOCK_V,
        BLOCK_D,
    )
    if SOFTCAP:
        slope = soft_cap_slope(x, softcap)
        x = tl.where(cols[None, :] < vocab, soft_cap(x, softcap) * logit_scale, float("-inf"))
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=ignore_index)
    valid = row_mask & (targets != ignore_index)
    # The target as an int32 column of this tile (-1: not in it).
    local = targets - col_offset - tile_start
    target_col = tl.where((local >= 0) & (local < BLOCK_V), local, -1).to(tl.int32)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0) * LOG2E
    g_logprob = tl.where(valid, tl.load(grad_logprobs_ptr + rows, mask=row_mask, other=0.0), 0.0)
    log2_p = x - lse[:, None]
    p = tl.where(valid[:, None], tl.exp2(log2_p), 0.0)  # also keeps all--inf ignored rows from turning NaN
    grad_x = g_logprob[:, None] * (tl.where(tile_cols[None, :] == target_col[:, None], 1.0, 0.0) - p)
    if HAS_GRAD_ENTROPY:
        g_entropy = tl.where(valid, tl.load(grad_entropy_ptr + rows, mask=row_mask, other=0.0), 0.0)
        entropy = tl.load(entropy_ptr + rows, mask=row_mask, other=0.0)
        grad_x -= g_entropy[:, None] * tl.where(p > 0, p * (log2_p * LN2 + entropy[:, None]), 0.0)
    grad_x *= inv_temperature
    if SOFTCAP:
        grad_x *= slope
    out = grad_logits_ptr + rows[:, None] * stride_gn + cols[None, :]
    tl.store(out, grad_x.to(grad_logits_ptr.dtype.element_ty), mask=row_mask[:, None] & (cols[None, :] < vocab))


@on_operand_device
def linear_logprobs_grad_logits(
    out: torch.Tensor,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    col_offset: int = 0,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Write (and return) `d loss / d logits` of the chunk `hidden [n, D]` x `weight [v, D]` into `out [n, v]`
    (a view with a contiguous last dim). Per-token tensors are the chunk's slices; `weight` holds the vocabulary
    rows from `col_offset` on, and `targets` are ids in the whole vocabulary."""
    n_tokens, dim = hidden.shape
    vocab = weight.shape[0]
    has_grad_entropy = grad_entropy is not None
    heavy = has_grad_entropy or bool(softcap)
    arch = 0 if interpreting() else arch_family(hidden.device)
    blocks = grad_blocks(hidden.dtype, arch, heavy)
    tma = tma_loads(arch, hidden, weight)
    grid = (triton.cdiv(n_tokens, blocks.block_n), triton.cdiv(vocab, blocks.block_v))
    _grad_logits_kernel[grid](
        out,
        gemm_operand(hidden, blocks.block_n, blocks.block_d, tma),
        gemm_operand(weight, blocks.block_v, blocks.block_d, tma),
        bias if bias is not None else hidden,
        targets,
        lse,
        entropy if has_grad_entropy else lse,
        grad_logprobs,
        grad_entropy if has_grad_entropy else grad_logprobs,
        n_tokens,
        vocab,
        dim,
        hidden.stride(0),
        weight.stride(0),
        out.stride(0),
        col_offset,
        LOG2E.value / temperature,
        1.0 / temperature,
        softcap or 1.0,
        ignore_index,
        HAS_BIAS=bias is not None,
        SOFTCAP=bool(softcap),
        HAS_GRAD_ENTROPY=has_grad_entropy,
        **gemm_constexprs(hidden.dtype, blocks, tma),
        num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
    )
    return out


def _add_product_fp32(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """`acc += a @ b` for fp32 `acc`: 16-bit CUDA operands take cuBLAS's fp32-output GEMM (fp32 accumulation, one
    fp32 result: 16 MiB at [1024, 4096], within the 64 MiB bound), so the product is not rounded to 16 bits first;
    elsewhere (the interpreter's CPU tensors, fp32 operands) the operands are fp32, in which products of 16-bit
    values are exact, so both sum the same products. (`mm(out_dtype=)` exists from torch 2.8 on; `addmm` with an
    fp32 `acc` and 16-bit operands is refused before torch 2.10.)"""
    if a.is_cuda and a.dtype in (torch.bfloat16, torch.float16):
        return acc.add_(torch.mm(a, b, out_dtype=torch.float32))
    return acc.addmm_(a.float(), b.float())


@on_operand_device
def linear_logprobs_backward(
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    needs_hidden_grad: bool,
    needs_weight_grad: bool,
    needs_bias_grad: bool,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of hidden, weight and bias (empty when not needed): each `[tokens, vocab]` tile of logit gradients,
    written in the input dtype by `_grad_logits_kernel` into one reused buffer, feeds two tensor-core GEMMs
    (accumulation: module docstring)."""
    n_tokens, vocab = hidden.shape[0], weight.shape[0]
    token_chunk = max(1, min(BACKWARD_TILE[0], n_tokens))
    vocab_chunk = max(1, min(BACKWARD_TILE[1], vocab))
    grad_hidden = torch.zeros_like(hidden) if needs_hidden_grad else hidden.new_empty(0)
    grad_weight = torch.zeros_like(weight) if needs_weight_grad else weight.new_empty(0)
    grad_bias = torch.zeros(vocab, dtype=torch.float32, device=hidden.device) if needs_bias_grad else None
    # Every tile is written into one reused buffer, viewed contiguously at that tile's shape (edge tiles are smaller).
    tile_buffer = torch.empty(token_chunk * vocab_chunk, dtype=hidden.dtype, device=hidden.device)
    grad_logprobs = grad_logprobs.float().contiguous()
    grad_entropy = grad_entropy.float().contiguous() if grad_entropy is not None else None
    for n0 in range(0, n_tokens, token_chunk):
        n1 = min(n0 + token_chunk, n_tokens)
        h = hidden[n0:n1]
        hidden_acc = torch.zeros((n1 - n0, hidden.shape[1]), dtype=torch.float32, device=hidden.device)
        for v0 in range(0, vocab, vocab_chunk):
            v1 = min(v0 + vocab_chunk, vocab)
            w = weight[v0:v1]
            grad_tile = linear_logprobs_grad_logits(
                tile_buffer[: (n1 - n0) * (v1 - v0)].view(n1 - n0, v1 - v0),
                h,
                w,
                bias[v0:v1] if bias is not None else None,
                targets[n0:n1],
                lse[n0:n1],
                entropy[n0:n1] if entropy is not None else None,
                grad_logprobs[n0:n1],
                grad_entropy[n0:n1] if grad_entropy is not None else None,
                temperature,
                ignore_index,
                col_offset=v0,
                softcap=softcap,
            )
            if needs_hidden_grad:
                hidden_acc = _add_product_fp32(hidden_acc, grad_tile, w)
            if needs_weight_grad:
                grad_weight[v0:v1].addmm_(grad_tile.T, h)
            if grad_bias is not None:
                grad_bias[v0:v1] += grad_tile.sum(0, dtype=torch.float32)
        if needs_hidden_grad:
            grad_hidden[n0:n1] = hidden_acc
    grad_bias = grad_bias.to(hidden.dtype) if grad_bias is not None else hidden.new_empty(0)
    return grad_hidden, grad_weight, grad_bias


# ------------------------------------------------------------------------------------- ahead-of-time compile check


def compile_specs(arch: int) -> list[KernelSpec]:
    """The gradient tile's configurations on `arch`: heaviest variant (bias, soft-cap, entropy gradient) and
    lightest (log-prob gradient only), for each operand dtype; 16-bit ones on sm_90 with TMA and with pointer loads."""
    specs = []
    for dtype, heavy, tma in itertools.product(
        (torch.bfloat16, torch.float16, torch.float32), (True, False), (True, False)
    ):
        if tma and (arch < 90 or dtype == torch.float32):  # TMA: sm_90 on, 16-bit operands (`_common.tma_loads`)
            continue
        constexprs = dict(HAS_BIAS=heavy, SOFTCAP=heavy, HAS_GRAD_ENTROPY=heavy)
        label = "entropy+bias+softcap" if heavy else "plain"
        pointers = dict(grad_logits_ptr=TL_TYPE_NAMES[dtype])
        specs.append(
            gemm_kernel_spec(
                _grad_logits_kernel,
                label,
                dtype,
                grad_blocks(dtype, arch, heavy),
                tma,
                constexprs,
                pointers=pointers,
                floats=("inv_temperature",),
            )
        )
    return specs
