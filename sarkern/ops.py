"""The public ops: log-probs, entropy and per-sequence perplexity without `[tokens, vocab]` logits.

Each op is a `torch.library` custom op with a fake (meta) implementation and a registered backward, so autograd
and `torch.compile(fullgraph=True)` see one opaque node. The public functions below check shapes, dtypes and
devices (static facts, fine to check while tracing); the op implementations check the values (target ids,
segment ids) at run time, then dispatch to the Triton kernels or the chunked PyTorch path (`sarkern.backends`).
"""

from __future__ import annotations

import math
import numbers
import operator
import warnings
from typing import Optional

import torch
from torch import Tensor

from . import chunked
from .backends import kernels, select_backend

__all__ = ["linear_token_logprobs", "sequence_perplexity", "token_logprobs"]

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Ignored tokens inside `sequence_perplexity` (segment id < 0) are marked with this target internally.
_SEGMENT_IGNORE = -100


# ------------------------------------------------------------------------------------------------- checks


def _check_float(name: str, tensor: Tensor) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, bfloat16 or float16, got {tensor.dtype}")


def _check_index(name: str, tensor: Tensor) -> None:
    if not isinstance(tensor, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
    if tensor.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"{name} must hold integer ids, got {tensor.dtype}")


def _check_same_device(**tensors: Tensor | None) -> None:
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{name} on {device}" for name, device in devices.items())
        raise ValueError(f"all inputs must be on one device, got {listed}")


# The logits are scaled by 1/temperature in fp32: below the smallest normal fp32 number that scale overflows.
_MIN_TEMPERATURE = torch.finfo(torch.float32).tiny
_MAX_TEMPERATURE = torch.finfo(torch.float32).max
_INT64 = torch.iinfo(torch.int64)


def check_temperature(temperature) -> float:
    """`temperature` as a float, or a ValueError naming why it cannot scale fp32 logits (also used by the scorer)."""
    if isinstance(temperature, bool) or not isinstance(temperature, (numbers.Real, Tensor)):
        raise TypeError(f"temperature must be a real number, got {type(temperature).__name__}")
    temperature = float(temperature)
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive finite number, got {temperature}")
    if not _MIN_TEMPERATURE <= temperature <= _MAX_TEMPERATURE:
        raise ValueError(
            f"temperature {temperature:g} is outside [{_MIN_TEMPERATURE:.4g}, {_MAX_TEMPERATURE:.4g}]: the logits are "
            "scaled by 1/temperature in float32, which would overflow (every result NaN) or vanish"
        )
    return temperature


def _check_softcap(softcap) -> float:
    """`softcap` as a float, 0.0 for None (no capping), or an error naming why it cannot cap logits."""
    if softcap is None:
        return 0.0
    if isinstance(softcap, bool) or not isinstance(softcap, (numbers.Real, Tensor)):
        raise TypeError(f"softcap must be None or a real number, got {type(softcap).__name__}")
    softcap = float(softcap)
    if not (math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be None or a positive finite number, got {softcap}")
    return softcap


def _check_ignore_index(ignore_index) -> int:
    if isinstance(ignore_index, bool):
        raise TypeError("ignore_index must be an integer, got a bool")
    try:
        value = operator.index(ignore_index)
    except TypeError:
        raise TypeError(f"ignore_index must be an integer, got {type(ignore_index).__name__}") from None
    if not _INT64.min <= value <= _INT64.max:
        raise ValueError(f"ignore_index must fit in int64, got {value}")
    return value


def _wide(ids: Tensor) -> Tensor:
    """Ids as int64, so that comparisons with the vocabulary size and `ignore_index` never wrap around
    (uint8 id 156 is not -100; an int16 id 25000 is below a vocabulary of 40000)."""
    return ids if ids.dtype == torch.int64 else ids.long()


def _check_targets_in_vocab(targets: Tensor, vocab: int, ignore_index: int | None) -> None:
    """Run-time check of the target ids: the kernels would ignore a bad id silently, so refuse it here.
    With `ignore_index=None` every target must be a token id."""
    if targets.numel() == 0:
        return
    targets = _wide(targets)
    bad = (targets < 0) | (targets >= vocab)
    if ignore_index is not None:
        bad &= targets != ignore_index
    if bool(bad.any()):
        first = targets[bad][0].item()
        allowed = f" or equal ignore_index={ignore_index}" if ignore_index is not None else ""
        raise ValueError(
            f"targets must be in [0, {vocab}){allowed}; found {first} ({int(bad.sum())} bad of {targets.numel()})"
        )


def _check_linear_inputs(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor) -> None:
    _check_float("hidden", hidden)
    _check_float("weight", weight)
    _check_index("targets", targets)
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, D], got shape {tuple(weight.shape)}")
    if weight.shape[0] == 0:
        raise ValueError("weight has an empty vocabulary dimension (V = 0)")
    if weight.shape[1] == 0:
        raise ValueError("hidden and weight have an empty hidden dimension (D = 0): there is nothing to project")
    if hidden.dim() < 1 or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(
            f"hidden [..., D] and weight [V, D] disagree on D: {tuple(hidden.shape)} vs {tuple(weight.shape)}"
        )
    if hidden.shape[:-1] != targets.shape:
        raise ValueError(
            f"targets must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, got {tuple(targets.shape)}"
        )
    if weight.dtype != hidden.dtype:
        raise TypeError(f"hidden and weight must share a dtype, got {hidden.dtype} and {weight.dtype}")
    if bias is not None:
        _check_float("bias", bias)
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape [V] = ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias must have the dtype of hidden, {hidden.dtype}, got {bias.dtype}")
    _check_same_device(hidden=hidden, weight=weight, bias=bias, targets=targets)


def _rows(tensor: Tensor) -> Tensor:
    """`[..., D]` as a 2-D tensor with a contiguous last dim, as the kernels read it."""
    tensor = tensor.reshape(-1, tensor.shape[-1])
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def _f32_empty(like: Tensor, shape) -> Tensor:
    return like.new_empty(shape, dtype=torch.float32)


# ------------------------------------------------------------------------------------ token_logprobs (logits)


@torch.library.custom_op("sarkern::token_logprobs", mutates_args=())
def _token_logprobs_op(
    logits: Tensor,
    targets: Tensor,
    temperature: float,
    ignore_index: int,
    return_entropy: bool,
    softcap: float,
    check_inputs: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    if check_inputs:
        _check_targets_in_vocab(targets, logits.shape[-1], ignore_index)
    if select_backend(logits.device) == "triton":
        impl = kernels().token_logprobs_forward
    else:
        impl = chunked.token_logprobs_forward
    logprobs, entropy, lse = impl(logits, targets, temperature, ignore_index, return_entropy, softcap)
    shape = targets.shape
    return logprobs.view(shape), entropy.view(shape if return_entropy else (0,)), lse.view(shape)


@_token_logprobs_op.register_fake
def _(logits, targets, temperature, ignore_index, return_entropy, softcap, check_inputs):
    shape = targets.shape
    return _f32_empty(logits, shape), _f32_empty(logits, shape if return_entropy else (0,)), _f32_empty(logits, shape)


@torch.library.custom_op("sarkern::token_logprobs_backward", mutates_args=())
def _token_logprobs_backward_op(
    grad_logprobs: Tensor,
    grad_entropy: Optional[Tensor],
    logits: Tensor,
    targets: Tensor,
    lse: Tensor,
    entropy: Optional[Tensor],
    temperature: float,
    ignore_index: int,
    softcap: float,
) -> Tensor:
    if select_backend(logits.device) == "triton":
        impl = kernels().token_logprobs_backward
    else:
        impl = chunked.token_logprobs_backward
    flat = lambda t: None if t is None else t.reshape(-1).float().contiguous()  # noqa: E731
    grads = (flat(grad_logprobs), flat(grad_entropy))
    return impl(*grads, logits, targets, flat(lse), flat(entropy), temperature, ignore_index, softcap)


@_token_logprobs_backward_op.register_fake
def _(grad_logprobs, grad_entropy, logits, targets, lse, entropy, temperature, ignore_index, softcap):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def _token_logprobs_setup(ctx, inputs, output):
    logits, targets, temperature, ignore_index, return_entropy, softcap, _check_inputs = inputs
    _, entropy, lse = output
    ctx.save_for_backward(logits, targets, lse, entropy)
    ctx.temperature, ctx.ignore_index, ctx.return_entropy = temperature, ignore_index, return_entropy
    ctx.softcap = softcap


def _token_logprobs_backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
    logits, targets, lse, entropy = ctx.saved_tensors
    if not ctx.return_entropy:
        grad_entropy, entropy = None, None
    grad_logits = _token_logprobs_backward_op(
        grad_logprobs, grad_entropy, logits, targets, lse, entropy, ctx.temperature, ctx.ignore_index, ctx.softcap
    )
    return grad_logits, None, None, None, None, None, None


_token_logprobs_op.register_autograd(_token_logprobs_backward, setup_context=_token_logprobs_setup)


def token_logprobs(
    logits: Tensor,
    targets: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    softcap: float | None = None,
    check_inputs: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """fp32 `log softmax(logits / temperature)[targets]` for `logits [..., V]` and `targets [...]`.

    One read of the logits, fp32 accumulation whatever their dtype. With `return_entropy=True`, also returns the
    fp32 entropy of `softmax(logits / temperature)` at each position. Positions whose target is `ignore_index` give
    log-prob 0 and entropy 0, and pass no gradient. Differentiable with respect to `logits`.

    `softcap`: the logits are first soft-capped, `softcap * tanh(logits / softcap)` (Gemma 2), then divided by the
    temperature. `check_inputs=False` skips the run-time check that every target is a token id or `ignore_index`
    (a device-to-host sync): the op then launches without any sync and can be captured in a CUDA graph; a target
    outside the vocabulary is then never read out of bounds; its log-prob is NaN (the caller vouches for the ids).
    """
    _check_float("logits", logits)
    _check_index("targets", targets)
    if logits.dim() < 1 or logits.shape[:-1] != targets.shape:
        raise ValueError(
            f"targets must have shape logits.shape[:-1] = {tuple(logits.shape[:-1])}, got {tuple(targets.shape)}"
        )
    if logits.shape[-1] == 0:
        raise ValueError("logits have an empty vocabulary dimension")
    _check_same_device(logits=logits, targets=targets)
    logprobs, entropy, _ = _token_logprobs_op(
        logits,
        _wide(targets),
        check_temperature(temperature),
        _check_ignore_index(ignore_index),
        bool(return_entropy),
        _check_softcap(softcap),
        bool(check_inputs),
    )
    return (logprobs, entropy) if return_entropy else logprobs


# ------------------------------------------------------------------------------- from hidden and LM-head weight


def _linear_forward(
    hidden, weight, bias, targets, temperature, ignore_index, return_entropy, segment_ids, num_segments, softcap
):
    args = (hidden, weight, bias, targets, temperature, ignore_index, return_entropy, segment_ids, num_segments)
    if select_backend(hidden.device) == "triton":
        return kernels().linear_logprobs_forward(*args, softcap)
    return chunked.linear_logprobs_forward(*args, softcap)


@torch.library.custom_op("sarkern::linear_token_logprobs", mutates_args=())
def _linear_token_logprobs_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    temperature: float,
    ignore_index: int,
    return_entropy: bool,
    softcap: float,
    check_inputs: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    if check_inputs:
        _check_targets_in_vocab(targets, weight.shape[0], ignore_index)
    logprobs, entropy, lse, _, _ = _linear_forward(
        hidden, weight, bias, targets, temperature, ignore_index, return_entropy, None, 0, softcap
    )
    return logprobs, entropy, lse


@_linear_token_logprobs_op.register_fake
def _(hidden, weight, bias, targets, temperature, ignore_index, return_entropy, softcap, check_inputs):
    n = hidden.shape[0]
    return _f32_empty(hidden, (n,)), _f32_empty(hidden, (n if return_entropy else 0,)), _f32_empty(hidden, (n,))


@torch.library.custom_op("sarkern::segment_logprob_sums", mutates_args=())
def _segment_logprob_sums_op(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    segment_ids: Tensor,
    num_segments: int,
    temperature: float,
    softcap: float,
    check_inputs: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    if check_inputs:
        if segment_ids.numel() and bool((segment_ids >= num_segments).any()):
            raise ValueError(f"segment_ids must be below num_segments={num_segments}; found {int(segment_ids.max())}")
        counted = segment_ids >= 0
        _check_targets_in_vocab(targets[counted], weight.shape[0], None)  # every counted token needs a real target
    _, _, lse, sums, counts = _linear_forward(
        hidden,
        weight,
        bias,
        _segment_targets(targets, segment_ids),
        temperature,
        _SEGMENT_IGNORE,
        False,
        segment_ids,
        num_segments,
        softcap,
    )
    empty = int((counts == 0).sum()) if check_inputs else 0
    if empty:
        warnings.warn(
            f"sequence_perplexity: {empty} of {num_segments} segments have no tokens; their perplexity is NaN",
            RuntimeWarning,
            stacklevel=2,
        )
    return sums, counts, lse


@_segment_logprob_sums_op.register_fake
def _(hidden, weight, bias, targets, segment_ids, num_segments, temperature, softcap, check_inputs):
    return (
        _f32_empty(hidden, (num_segments,)),
        _f32_empty(hidden, (num_segments,)),
        _f32_empty(hidden, (hidden.shape[0],)),
    )


@torch.library.custom_op("sarkern::linear_token_logprobs_backward", mutates_args=())
def _linear_backward_op(
    grad_logprobs: Tensor,
    grad_entropy: Optional[Tensor],
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    targets: Tensor,
    lse: Tensor,
    entropy: Optional[Tensor],
    temperature: float,
    ignore_index: int,
    needs_hidden_grad: bool,
    needs_weight_grad: bool,
    needs_bias_grad: bool,
    softcap: float,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients of hidden, weight and bias (empty when not needed), from logits recomputed one tile at a time:
    each `[tokens, vocab]` tile of logit gradients becomes two GEMM updates, so memory stays at one tile."""
    args = (grad_logprobs, grad_entropy, hidden, weight, bias, targets, lse, entropy, temperature, ignore_index)
    needs = (needs_hidden_grad, needs_weight_grad, needs_bias_grad)
    if select_backend(hidden.device) == "triton":
        return kernels().linear_logprobs_backward(*args, *needs, softcap)
    return chunked.linear_logprobs_backward(*args, *needs, softcap)


@_linear_backward_op.register_fake
def _(
    grad_logprobs,
    grad_entropy,
    hidden,
    weight,
    bias,
    targets,
    lse,
    entropy,
    temperature,
    ignore_index,
    needs_hidden_grad,
    needs_weight_grad,
    needs_bias_grad,
    softcap,
):
    return (
        torch.empty_like(hidden) if needs_hidden_grad else hidden.new_empty(0),
        torch.empty_like(weight) if needs_weight_grad else weight.new_empty(0),
        hidden.new_empty((weight.shape[0],)) if needs_bias_grad else hidden.new_empty(0),
    )


def _linear_grads(ctx, grad_logprobs, grad_entropy, entropy):
    hidden, weight, bias, targets, lse = ctx.saved_tensors[:5]
    needs = ctx.needs_input_grad
    grad_hidden, grad_weight, grad_bias = _linear_backward_op(
        grad_logprobs,
        grad_entropy,
        hidden,
        weight,
        bias,
        targets,
        lse,
        entropy,
        ctx.temperature,
        ctx.ignore_index,
        needs[0],
        needs[1],
        bias is not None and needs[2],
        ctx.softcap,
    )
    return (
        grad_hidden if needs[0] else None,
        grad_weight if needs[1] else None,
        grad_bias if bias is not None and needs[2] else None,
    )


def _linear_setup(ctx, inputs, output):
    hidden, weight, bias, targets, temperature, ignore_index, return_entropy, softcap, _check_inputs = inputs
    _, entropy, lse = output
    ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
    ctx.temperature, ctx.ignore_index, ctx.return_entropy = temperature, ignore_index, return_entropy
    ctx.softcap = softcap


def _linear_backward(ctx, grad_logprobs, grad_entropy, _grad_lse):
    entropy = ctx.saved_tensors[5] if ctx.return_entropy else None
    grads = _linear_grads(ctx, grad_logprobs, grad_entropy if ctx.return_entropy else None, entropy)
    return (*grads, None, None, None, None, None, None)


_linear_token_logprobs_op.register_autograd(_linear_backward, setup_context=_linear_setup)


def _segment_targets(targets: Tensor, segment_ids: Tensor) -> Tensor:
    """Targets with the tokens outside every segment marked as ignored (their ids are never read)."""
    return torch.where(segment_ids >= 0, targets, _SEGMENT_IGNORE)


def _segment_setup(ctx, inputs, output):
    hidden, weight, bias, targets, segment_ids, num_segments, temperature, softcap, _check_inputs = inputs
    _, _, lse = output
    ctx.save_for_backward(hidden, weight, bias, _segment_targets(targets, segment_ids), lse, segment_ids)
    ctx.temperature, ctx.ignore_index, ctx.softcap = temperature, _SEGMENT_IGNORE, softcap


def _segment_backward(ctx, grad_sums, _grad_counts, _grad_lse):
    segment_ids = ctx.saved_tensors[5]
    # Each counted token's log-prob enters its segment's sum with weight one (ids past the last segment: none).
    num_segments = grad_sums.shape[0]
    counted = (segment_ids >= 0) & (segment_ids < num_segments)
    gathered = grad_sums[segment_ids.clamp(0, max(num_segments - 1, 0))] if num_segments else grad_sums.new_zeros(1)
    grad_logprobs = torch.where(counted, gathered, 0.0)
    return (*_linear_grads(ctx, grad_logprobs, None, None), None, None, None, None, None, None)


_segment_logprob_sums_op.register_autograd(_segment_backward, setup_context=_segment_setup)


def linear_token_logprobs(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    ignore_index: int = -100,
    return_entropy: bool = False,
    softcap: float | None = None,
    check_inputs: bool = True,
) -> Tensor | tuple[Tensor, Tensor]:
    """`token_logprobs(hidden @ weight.T + bias, targets, ...)` without ever allocating `[tokens, V]` logits.

    `hidden [..., D]`, `weight [V, D]` (the LM head), `bias [V]` or None, `targets [...]`; fp32 results of shape
    `targets.shape`. Positions whose target is `ignore_index` give log-prob 0 and (with `return_entropy=True`)
    entropy 0, and pass no gradient. Differentiable with respect to `hidden`, `weight` and `bias`. `softcap` and
    `check_inputs` as in `token_logprobs`.
    """
    _check_linear_inputs(hidden, weight, bias, targets)
    lead = targets.shape
    logprobs, entropy, _ = _linear_token_logprobs_op(
        _rows(hidden),
        weight if weight.stride(-1) == 1 else weight.contiguous(),
        bias.contiguous() if bias is not None else None,
        _wide(targets).reshape(-1).contiguous(),
        check_temperature(temperature),
        _check_ignore_index(ignore_index),
        bool(return_entropy),
        _check_softcap(softcap),
        bool(check_inputs),
    )
    if return_entropy:
        return logprobs.view(lead), entropy.view(lead)
    return logprobs.view(lead)


def sequence_perplexity(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    segment_ids: Tensor,
    num_segments: int,
    *,
    bias: Tensor | None = None,
    temperature: float = 1.0,
    softcap: float | None = None,
    check_inputs: bool = True,
) -> Tensor:
    """fp32 perplexity `exp(-mean log p(target))` of each of `num_segments` segments of tokens.

    Token `i` belongs to segment `segment_ids[i]`; tokens with a negative id are ignored (their targets are not
    read). The log-probs and the per-segment sums come from one fused pass. A segment without tokens gets NaN,
    and a RuntimeWarning says how many there were. Differentiable with respect to `hidden`, `weight`, `bias`.

    `softcap` as in `token_logprobs`. `check_inputs=False` skips the run-time checks of the ids and the count of
    empty segments (device-to-host syncs): no warning then, though empty segments are still NaN; a segment id at or
    past `num_segments` is dropped, never written out of bounds.
    """
    _check_linear_inputs(hidden, weight, bias, targets)
    _check_index("segment_ids", segment_ids)
    if segment_ids.shape != targets.shape:
        raise ValueError(
            f"segment_ids must have the shape of targets {tuple(targets.shape)}, got {tuple(segment_ids.shape)}"
        )
    _check_same_device(hidden=hidden, segment_ids=segment_ids)
    num_segments = _check_num_segments(num_segments, segment_ids.numel())
    segment_ids = _wide(segment_ids).reshape(-1).contiguous()
    targets = _wide(targets).reshape(-1).contiguous()
    sums, counts, _ = _segment_logprob_sums_op(
        _rows(hidden),
        weight if weight.stride(-1) == 1 else weight.contiguous(),
        bias.contiguous() if bias is not None else None,
        targets,
        segment_ids,
        num_segments,
        check_temperature(temperature),
        _check_softcap(softcap),
        bool(check_inputs),
    )
    return torch.exp(-sums / counts)


def _check_num_segments(num_segments, n_tokens: int) -> int:
    """The output has `num_segments` values; more than there are tokens can only be empty (NaN) segments, and a
    careless 10**9 would allocate gigabytes for 4 tokens."""
    if isinstance(num_segments, bool):
        raise ValueError("num_segments must be a non-negative int, got a bool")
    try:
        num_segments = operator.index(num_segments)
    except TypeError:
        raise ValueError(f"num_segments must be a non-negative int, got {num_segments!r}") from None
    if num_segments < 0:
        raise ValueError(f"num_segments must be a non-negative int, got {num_segments}")
    if num_segments > n_tokens:
        raise ValueError(
            f"num_segments={num_segments} exceeds the {n_tokens} tokens given: at most one segment per token can "
            "hold a token, the rest could only be empty (NaN)"
        )
    return num_segments
