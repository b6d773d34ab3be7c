"""Log-probs of target tokens from hidden states and the LM-head weight, never writing `[N, V]` logits.

Forward, two kernels:
1. `_partial_kernel`: a grid of (token blocks) x (vocabulary splits). Each program computes logit tiles
   `[BLOCK_N, BLOCK_V] = hidden @ weight.T` with fp32 accumulation over D, for the vocabulary tiles of its split,
   and folds them into an online log-sum-exp: running max `m`, `s = sum exp(x - m)`, `t = sum exp(x - m)(x - m)`,
   and the target's logit taken from the same accumulator. Splitting the vocabulary keeps every SM busy when the
   number of tokens is small; each split writes four fp32 values per token.
2. `_combine_kernel`: merges the splits of each token into `lse`, the log-prob and the entropy, and, for
   `sequence_perplexity`, adds each log-prob and a count of one into its segment's slot.

Backward: `_grad_logits_kernel` recomputes one `[tokens, vocab]` chunk of logits tile by tile and writes
`d loss / d logits` for that chunk only; the caller turns each chunk into the gradients of hidden, weight and
bias with two GEMMs, so memory stays bounded by the chunk.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import dot_precision, dot_upcast, interpreting, soft_cap, soft_cap_slope


@triton.jit
def _logits_tile(
    hidden_ptr,
    weight_ptr,
    bias_ptr,
    rows,
    cols,
    n_tokens,
    vocab,
    dim,
    stride_hn,
    stride_wv,
    inv_temperature,
    softcap,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """fp32 `(hidden[rows] @ weight[cols].T + bias[cols]) / T`, soft-capped before the division with SOFTCAP, and
    -inf in the columns past the vocabulary."""
    row_mask = rows < n_tokens
    col_mask = cols < vocab
    acc = tl.zeros((BLOCK_N, BLOCK_V), tl.float32)
    for d_start in range(0, dim, BLOCK_D):
        ds = d_start + tl.arange(0, BLOCK_D)
        d_mask = ds < dim
        h = tl.load(
            hidden_ptr + rows[:, None] * stride_hn + ds[None, :], mask=row_mask[:, None] & d_mask[None, :], other=0.0
        )
        w = tl.load(
            weight_ptr + cols[:, None] * stride_wv + ds[None, :], mask=col_mask[:, None] & d_mask[None, :], other=0.0
        )
        if UPCAST:
            h = h.to(tl.float32)
            w = w.to(tl.float32)
        acc = tl.dot(h, tl.trans(w), acc, input_precision=PRECISION)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if SOFTCAP:
        acc = soft_cap(acc, softcap)
    return tl.where(col_mask[None, :], acc * inv_temperature, float("-inf"))


@triton.jit
def _partial_kernel(
    hidden_ptr,
    weight_ptr,
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
    inv_temperature,
    softcap,
    tiles_per_split,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    RETURN_ENTROPY: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    split = tl.program_id(1)
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < n_tokens
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=-1).to(tl.int64)

    m = tl.full((BLOCK_N,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK_N,), tl.float32)
    t = tl.zeros((BLOCK_N,), tl.float32)
    target_x = tl.zeros((BLOCK_N,), tl.float32)
    v_begin = split.to(tl.int64) * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, vocab)
    for v_start in range(v_begin, v_end, BLOCK_V):
        cols = v_start + tl.arange(0, BLOCK_V)
        x = _logits_tile(
            hidden_ptr,
            weight_ptr,
            bias_ptr,
            rows,
            cols,
            n_tokens,
            vocab,
            dim,
            stride_hn,
            stride_wv,
            inv_temperature,
            softcap,
            HAS_BIAS,
            SOFTCAP,
            UPCAST,
            PRECISION,
            BLOCK_N,
            BLOCK_V,
            BLOCK_D,
        )
        m_new = tl.maximum(m, tl.max(x, 1))
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        scale = tl.exp(m - shift)
        e = tl.exp(x - shift[:, None])
        if RETURN_ENTROPY:
            t = scale * (t + tl.where(s > 0, s * (m - shift), 0.0))
            t += tl.sum(tl.where(e > 0, e * (x - shift[:, None]), 0.0), 1)
        s = s * scale + tl.sum(e, 1)
        m = m_new
        target_x += tl.sum(tl.where(cols[None, :] == targets[:, None], x, 0.0), 1)

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
    weight = tl.where(s > 0, tl.exp(m - shift[None, :]), 0.0)
    total = tl.sum(s * weight, 0)
    log_total = tl.log(total)
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=ignore_index)
    valid = targets != ignore_index
    # (x - max) - log sum, not x - lse: lse is only as fine as the spacing of fp32 at the max logit.
    logprobs = (target_x - shift) - log_total
    # A target id outside the vocabulary (possible when the caller skipped the id check) gives NaN, never a value.
    logprobs = tl.where(valid, tl.where((targets < 0) | (targets >= vocab), float("nan"), logprobs), 0.0)
    tl.store(lse_ptr + rows, shift + log_total, mask=row_mask)
    tl.store(logprobs_ptr + rows, logprobs, mask=row_mask)
    if RETURN_ENTROPY:
        t = tl.load(part_t_ptr + offsets, mask=mask, other=0.0)
        # Each split's t is relative to its own max; move it to the common shift before summing.
        t_total = tl.sum(tl.where(s > 0, (t + s * (m - shift[None, :])) * weight, 0.0), 0)
        tl.store(entropy_ptr + rows, tl.where(valid, log_total - t_total / total, 0.0), mask=row_mask)
    if HAS_SEGMENTS:
        segments = tl.load(segment_ids_ptr + rows, mask=row_mask, other=-1).to(tl.int64)
        # Ids past the last segment are dropped, never written out of bounds (callers may skip the id check).
        counted = row_mask & (segments >= 0) & (segments < num_segments) & valid
        tl.atomic_add(segment_sums_ptr + segments, logprobs, mask=counted)
        tl.atomic_add(segment_counts_ptr + segments, tl.where(counted, 1.0, 0.0), mask=counted)


@triton.jit
def _grad_logits_kernel(
    grad_logits_ptr,
    hidden_ptr,
    weight_ptr,
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
    inv_temperature,
    softcap,
    ignore_index,
    HAS_BIAS: tl.constexpr,
    SOFTCAP: tl.constexpr,
    HAS_GRAD_ENTROPY: tl.constexpr,
    UPCAST: tl.constexpr,
    PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.program_id(1).to(tl.int64) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_mask = rows < n_tokens
    x = _logits_tile(
        hidden_ptr,
        weight_ptr,
        bias_ptr,
        rows,
        cols,
        n_tokens,
        vocab,
        dim,
        stride_hn,
        stride_wv,
        inv_temperature,
        softcap,
        HAS_BIAS,
        SOFTCAP,
        UPCAST,
        PRECISION,
        BLOCK_N,
        BLOCK_V,
        BLOCK_D,
    )
    targets = tl.load(targets_ptr + rows, mask=row_mask, other=ignore_index).to(tl.int64)
    valid = row_mask & (targets != ignore_index)
    lse = tl.load(lse_ptr + rows, mask=row_mask, other=0.0)
    g_logprob = tl.where(valid, tl.load(grad_logprobs_ptr + rows, mask=row_mask, other=0.0), 0.0)
    log_p = x - lse[:, None]
    p = tl.where(valid[:, None], tl.exp(log_p), 0.0)  # also keeps all--inf ignored rows from turning NaN
    grad_x = g_logprob[:, None] * (tl.where(cols[None, :] + col_offset == targets[:, None], 1.0, 0.0) - p)
    if HAS_GRAD_ENTROPY:
        g_entropy = tl.where(valid, tl.load(grad_entropy_ptr + rows, mask=row_mask, other=0.0), 0.0)
        entropy = tl.load(entropy_ptr + rows, mask=row_mask, other=0.0)
        grad_x -= g_entropy[:, None] * tl.where(p > 0, p * (log_p + entropy[:, None]), 0.0)
    grad_x *= inv_temperature
    if SOFTCAP:
        grad_x *= soft_cap_slope(x / inv_temperature, softcap)
    out = grad_logits_ptr + rows[:, None] * stride_gn + cols[None, :]
    tl.store(
        out,
        grad_x.to(grad_logits_ptr.dtype.element_ty),
        mask=row_mask[:, None] & (cols[None, :] < vocab),
    )


def _blocks(dtype: torch.dtype) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_V, BLOCK_D, num_warps, num_stages); tiny blocks keep the CPU interpreter quick."""
    if interpreting():
        return 16, 32, 16, 1, 1
    if dtype == torch.float32:
        return 64, 64, 32, 4, 3
    return 128, 128, 64, 8, 3


def _num_splits(n_blocks: int, n_vocab_tiles: int, device: torch.device) -> int:
    """Enough vocabulary splits for about two waves of programs over the SMs, never more than the tiles."""
    if device.type != "cuda":
        return min(2, n_vocab_tiles)
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_vocab_tiles, triton.cdiv(2 * sms, n_blocks), 64))


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
    num_splits: int | None = None,
) -> tuple[torch.Tensor, ...]:
    """Per-token fp32 (logprobs, entropy or empty, lse, segment_sums, segment_counts) for `hidden [N, D]`.

    `hidden` and `weight` must have a contiguous last dim. Tokens whose target is `ignore_index` get log-prob 0
    and are left out of their segment. Segment sums and counts are empty unless `segment_ids` is given.
    """
    n_tokens, dim = hidden.shape
    vocab = weight.shape[0]
    device = hidden.device
    block_n, block_v, block_d, num_warps, num_stages = _blocks(hidden.dtype)
    n_blocks = max(1, triton.cdiv(n_tokens, block_n))
    n_vocab_tiles = triton.cdiv(vocab, block_v)
    splits = num_splits or _num_splits(n_blocks, n_vocab_tiles, device)
    splits = max(1, min(splits, n_vocab_tiles))
    tiles_per_split = triton.cdiv(n_vocab_tiles, splits)
    splits = triton.cdiv(n_vocab_tiles, tiles_per_split)

    f32 = dict(dtype=torch.float32, device=device)
    partials = torch.empty((4, splits, n_tokens), **f32)
    logprobs = torch.empty(n_tokens, **f32)
    lse = torch.empty(n_tokens, **f32)
    entropy = torch.empty(n_tokens, **f32) if return_entropy else logprobs.new_empty(0)
    has_segments = segment_ids is not None
    segment_sums = torch.zeros(num_segments if has_segments else 0, **f32)
    segment_counts = torch.zeros_like(segment_sums)
    if n_tokens == 0:
        return logprobs, entropy, lse, segment_sums, segment_counts

    _partial_kernel[(n_blocks, splits)](
        hidden,
        weight,
        bias if bias is not None else hidden,
        targets,
        partials[0],
        partials[1],
        partials[2],
        partials[3],
        n_tokens,
        vocab,
        dim,
        hidden.stride(0),
        weight.stride(0),
        1.0 / temperature,
        softcap or 1.0,
        tiles_per_split,
        HAS_BIAS=bias is not None,
        SOFTCAP=bool(softcap),
        RETURN_ENTROPY=return_entropy,
        UPCAST=dot_upcast(hidden.dtype),
        PRECISION=dot_precision(hidden.dtype),
        BLOCK_N=block_n,
        BLOCK_V=block_v,
        BLOCK_D=block_d,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    combine_block = 16 if interpreting() else 128
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
        splits,
        num_segments,
        ignore_index,
        RETURN_ENTROPY=return_entropy,
        HAS_SEGMENTS=has_segments,
        BLOCK_N=combine_block,
        BLOCK_S=triton.next_power_of_2(splits),
        num_warps=1 if interpreting() else 4,
    )
    return logprobs, entropy, lse, segment_sums, segment_counts


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
    block_n, block_v, block_d, num_warps, num_stages = _blocks(hidden.dtype)
    has_grad_entropy = grad_entropy is not None
    grid = (triton.cdiv(n_tokens, block_n), triton.cdiv(vocab, block_v))
    _grad_logits_kernel[grid](
        out,
        hidden,
        weight,
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
        1.0 / temperature,
        softcap or 1.0,
        ignore_index,
        HAS_BIAS=bias is not None,
        SOFTCAP=bool(softcap),
        HAS_GRAD_ENTROPY=has_grad_entropy,
        UPCAST=dot_upcast(hidden.dtype),
        PRECISION=dot_precision(hidden.dtype),
        BLOCK_N=block_n,
        BLOCK_V=block_v,
        BLOCK_D=block_d,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out


# Backward tiles: a [1024, 8192] bf16 tile of logit gradients is 16 MiB.
BACKWARD_TILE = (1024, 8192)


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
    written in the input dtype by `_grad_logits_kernel` into one reused buffer, feeds two tensor-core GEMMs. The
    weight gradient accumulates in its own dtype across token chunks (an fp32 [V, D] buffer would exceed the memory
    budget of DESIGN.md section 4)."""
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
                hidden_acc += grad_tile @ w
            if needs_weight_grad:
                grad_weight[v0:v1].addmm_(grad_tile.T, h)
            if grad_bias is not None:
                grad_bias[v0:v1] += grad_tile.sum(0, dtype=torch.float32)
        if needs_hidden_grad:
            grad_hidden[n0:n1] = hidden_acc
    grad_bias = grad_bias.to(hidden.dtype) if grad_bias is not None else hidden.new_empty(0)
    return grad_hidden, grad_weight, grad_bias
