"""Log-probs of target tokens (and entropy) from existing logits, in one pass over each row.

Forward: one program per row walks the vocabulary in blocks, keeping an online max `m`, the rescaled sum
`s = sum exp(x - m)` and `t = sum exp(x - m) * (x - m)` in fp32, where `x = logit / T`. Then

    lse = m + log s,     log p(target) = (x[target] - m) - log s,     entropy = log s - t / s.

Keeping `t` relative to the running max makes the entropy exact for logits of any magnitude (1e4 and more) and
`-inf` entries contribute nothing. The target logit is picked out of the same fp32 values by comparison, so no
index is ever dereferenced and a bad target cannot cause an out-of-bounds read.

Backward: with `p = softmax(x)`, d log p(target) / dx = onehot - p and d entropy / dx = -p * (log p + entropy);
both are divided by T for the gradient with respect to the logits.

Soft-capping (`SOFTCAP`): `x = cap * tanh(logit / cap) / T`; the backward multiplies by sech^2(logit / cap), from the
raw logit.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._common import KernelSpec, interpreting, on_operand_device, soft_cap, soft_cap_slope


@triton.jit
def _row_offset(row, rows_inner, stride_outer, stride_inner):
    # Rows are the flattened leading dims [outer, inner] of a possibly strided `[..., V]` tensor, so that slices
    # like `logits[:, :-1]` are read in place.
    return (row // rows_inner) * stride_outer + (row % rows_inner) * stride_inner


@triton.jit
def _raw_logits(row_ptr, cols, vocab):
    """fp32 logits of one block of a row; -inf past the vocabulary."""
    return tl.load(row_ptr + cols, mask=cols < vocab, other=float("-inf")).to(tl.float32)


@triton.jit
def _cap_and_scale(z, cols, vocab, inv_temperature, softcap, SOFTCAP: tl.constexpr):
    """fp32 `x = z / T` of raw logits `z` (soft-capped first with SOFTCAP); -inf past the vocabulary."""
    if SOFTCAP:
        z = tl.where(cols < vocab, soft_cap(z, softcap), float("-inf"))
    return z * inv_temperature


@triton.jit
def _scaled_logits(row_ptr, cols, vocab, inv_temperature, softcap, SOFTCAP: tl.constexpr):
    """fp32 `x = logits / T` (soft-capped first with SOFTCAP) of one block of a row; -inf past the vocabulary."""
    return _cap_and_scale(_raw_logits(row_ptr, cols, vocab), cols, vocab, inv_temperature, softcap, SOFTCAP)


@triton.jit
def _token_logprobs_fwd_kernel(
    logits_ptr,
    targets_ptr,
    logprobs_ptr,
    entropy_ptr,
    lse_ptr,
    vocab,
    rows_inner,
    stride_outer,
    stride_inner,
    inv_temperature,
    softcap,
    ignore_index,
    RETURN_ENTROPY: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + _row_offset(row, rows_inner, stride_outer, stride_inner)
    target = tl.load(targets_ptr + row).to(tl.int64)

    m = tl.full((), float("-inf"), tl.float32)
    s = tl.zeros((), tl.float32)
    t = tl.zeros((), tl.float32)
    target_x = tl.zeros((), tl.float32)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V).to(tl.int64)
        x = _scaled_logits(row_ptr, cols, vocab, inv_temperature, softcap, SOFTCAP)
        m_new = tl.maximum(m, tl.max(x, 0))
        # While every value so far is -inf, shift by 0 instead of -inf to keep exp() away from NaN.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        scale = tl.exp(m - shift)
        e = tl.exp(x - shift)
        if RETURN_ENTROPY:
            t = scale * (t + tl.where(s > 0, s * (m - shift), 0.0))
            t += tl.sum(tl.where(e > 0, e * (x - shift), 0.0), 0)
        s = s * scale + tl.sum(e, 0)
        m = m_new
        target_x += tl.sum(tl.where(cols == target, x, 0.0), 0)

    log_s = tl.log(s)
    valid = target != ignore_index
    logprob = (target_x - m) - log_s
    # A target id outside the vocabulary (possible when the caller skipped the id check) gives NaN, never a value.
    logprob = tl.where((target < 0) | (target >= vocab), float("nan"), logprob)
    tl.store(lse_ptr + row, m + log_s)
    # (x - m) - log s, not x - lse: forming lse first would round it to the spacing of fp32 at |m|.
    tl.store(logprobs_ptr + row, tl.where(valid, logprob, 0.0))
    if RETURN_ENTROPY:
        tl.store(entropy_ptr + row, tl.where(valid, tl.log(s) - t / s, 0.0))


@triton.jit
def _token_logprobs_bwd_kernel(
    grad_logits_ptr,
    grad_logprobs_ptr,
    grad_entropy_ptr,
    logits_ptr,
    targets_ptr,
    lse_ptr,
    entropy_ptr,
    vocab,
    rows_inner,
    stride_outer,
    stride_inner,
    inv_temperature,
    softcap,
    ignore_index,
    HAS_GRAD_ENTROPY: tl.constexpr,
    SOFTCAP: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    row_ptr = logits_ptr + _row_offset(row, rows_inner, stride_outer, stride_inner)
    grad_row_ptr = grad_logits_ptr + row * vocab
    target = tl.load(targets_ptr + row).to(tl.int64)
    valid = target != ignore_index
    lse = tl.load(lse_ptr + row)
    g_logprob = tl.where(valid, tl.load(grad_logprobs_ptr + row), 0.0)
    if HAS_GRAD_ENTROPY:
        g_entropy = tl.where(valid, tl.load(grad_entropy_ptr + row), 0.0)
        entropy = tl.load(entropy_ptr + row)
    for start in range(0, vocab, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V).to(tl.int64)
        mask = cols < vocab
        z = _raw_logits(row_ptr, cols, vocab)
        x = _cap_and_scale(z, cols, vocab, inv_temperature, softcap, SOFTCAP)
        log_p = x - lse
        # Ignored rows contribute nothing, also when every logit is -inf (lse = -inf would make p NaN).
        p = tl.where(valid, tl.exp(log_p), 0.0)
        grad_x = g_logprob * (tl.where(cols == target, 1.0, 0.0) - p)
        if HAS_GRAD_ENTROPY:
            grad_x -= g_entropy * tl.where(p > 0, p * (log_p + entropy), 0.0)
        grad = grad_x * inv_temperature
        if SOFTCAP:
            grad *= soft_cap_slope(z, softcap)  # from the raw logits (see soft_cap_slope)
        tl.store(grad_row_ptr + cols, grad.to(grad_logits_ptr.dtype.element_ty), mask=mask)


def _rows_layout(logits: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """View `[..., V]` as rows addressed by (outer, inner) strides; copy only when no such view exists."""
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    if logits.dim() == 1:
        logits = logits.unsqueeze(0)
    if logits.dim() > 3:
        logits = logits.reshape(-1, logits.shape[-2], logits.shape[-1])
    if logits.dim() == 2:
        return logits, logits.shape[0], 0, logits.stride(0)
    return logits, logits.shape[1], logits.stride(0), logits.stride(1)


# One program per row walks the vocabulary in blocks of up to 4096 values with 8 warps: 16 values per thread per
# block, so each thread issues 16-byte loads for fp32 rows (8-byte for 16-bit), enough bytes in flight per SM to
# stream the logits near HBM bandwidth.
MAX_BLOCK_V = 4096
NUM_WARPS = 8


def _block_v(vocab: int) -> int:
    if interpreting():
        return min(128, triton.next_power_of_2(vocab))
    return min(MAX_BLOCK_V, triton.next_power_of_2(vocab))


@on_operand_device
def token_logprobs_forward(
    logits: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    ignore_index: int,
    return_entropy: bool,
    softcap: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launch the forward kernel (`softcap` 0: none). `targets` holds one id per row of `logits [..., V]`; returns fp32
    (logprobs, entropy or an empty tensor, lse) with one value per row."""
    vocab = logits.shape[-1]
    n_rows = targets.numel()
    targets = targets.reshape(-1).contiguous()
    logprobs = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    lse = torch.empty_like(logprobs)
    entropy = torch.empty_like(logprobs) if return_entropy else logprobs.new_empty(0)
    if n_rows > 0:
        rows, rows_inner, stride_outer, stride_inner = _rows_layout(logits)
        _token_logprobs_fwd_kernel[(n_rows,)](
            rows,
            targets,
            logprobs,
            entropy,
            lse,
            vocab,
            rows_inner,
            stride_outer,
            stride_inner,
            1.0 / temperature,
            softcap or 1.0,
            ignore_index,
            RETURN_ENTROPY=return_entropy,
            SOFTCAP=bool(softcap),
            BLOCK_V=_block_v(vocab),
            num_warps=1 if interpreting() else NUM_WARPS,
        )
    return logprobs, entropy, lse


@on_operand_device
def token_logprobs_backward(
    grad_logprobs: torch.Tensor,
    grad_entropy: torch.Tensor | None,
    logits: torch.Tensor,
    targets: torch.Tensor,
    lse: torch.Tensor,
    entropy: torch.Tensor | None,
    temperature: float,
    ignore_index: int,
    softcap: float = 0.0,
) -> torch.Tensor:
    """Gradient with respect to `logits` (same dtype and shape), given fp32 gradients of the per-row outputs."""
    vocab = logits.shape[-1]
    n_rows = targets.numel()
    grad_logits = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    has_grad_entropy = grad_entropy is not None
    if n_rows > 0:
        rows, rows_inner, stride_outer, stride_inner = _rows_layout(logits)
        _token_logprobs_bwd_kernel[(n_rows,)](
            grad_logits,
            grad_logprobs.reshape(-1).float().contiguous(),
            grad_entropy.reshape(-1).float().contiguous() if has_grad_entropy else grad_logprobs,
            rows,
            targets.reshape(-1).contiguous(),
            lse,
            entropy if has_grad_entropy else lse,
            vocab,
            rows_inner,
            stride_outer,
            stride_inner,
            1.0 / temperature,
            softcap or 1.0,
            ignore_index,
            HAS_GRAD_ENTROPY=has_grad_entropy,
            SOFTCAP=bool(softcap),
            BLOCK_V=_block_v(vocab),
            num_warps=1 if interpreting() else NUM_WARPS,
        )
    return grad_logits


def compile_specs(arch: int) -> list[KernelSpec]:
    """Both kernels at the largest vocabulary block, for fp32 and bf16 logits, with every option on and off."""
    specs = []
    for dtype in ("fp32", "bf16"):
        for heavy in (True, False):
            variant = "entropy+softcap" if heavy else "plain"
            common = dict(num_warps=NUM_WARPS, num_stages=1, floats=("inv_temperature", "softcap"))
            specs.append(
                KernelSpec(
                    name=f"_token_logprobs_fwd_kernel[{dtype}, {variant}]",
                    kernel=_token_logprobs_fwd_kernel,
                    constexprs=dict(RETURN_ENTROPY=heavy, SOFTCAP=heavy, BLOCK_V=MAX_BLOCK_V),
                    pointers=dict(logits_ptr=dtype, targets_ptr="i64"),
                    **common,
                )
            )
            specs.append(
                KernelSpec(
                    name=f"_token_logprobs_bwd_kernel[{dtype}, {variant}]",
                    kernel=_token_logprobs_bwd_kernel,
                    constexprs=dict(HAS_GRAD_ENTROPY=heavy, SOFTCAP=heavy, BLOCK_V=MAX_BLOCK_V),
                    pointers=dict(grad_logits_ptr=dtype, logits_ptr=dtype, targets_ptr="i64"),
                    **common,
                )
            )
    return specs
