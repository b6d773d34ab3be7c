"""Input handling of :meth:`sarkern.SARScorer.score`: token-id batches (lists or padded tensors with masks),
placeholder prompts and the caller's conditioned log-probs, checked and turned into 1-D int64 CPU tensors."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["BatchIds", "IdsLike", "as_sequences", "cond_nll_from_logprobs", "placeholder_rows"]

IdsLike = Sequence[int] | torch.Tensor
BatchIds = Sequence[IdsLike] | torch.Tensor


def as_sequences(
    ids: BatchIds, mask: torch.Tensor | None, name: str, *, allow_empty: bool, vocab_size: int
) -> list[torch.Tensor]:
    """A batch of id sequences (list of lists / 1-D tensors, or a 2-D tensor with an optional mask) as a list of
    1-D int64 CPU tensors, checked against the vocabulary."""
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 2:
            raise ValueError(f"{name} as a tensor must be 2-D [batch, length], got shape {tuple(ids.shape)}")
        if mask is not None:
            if mask.shape != ids.shape:
                raise ValueError(f"{name} mask shape {tuple(mask.shape)} differs from {name} {tuple(ids.shape)}")
            keep = mask.to("cpu").bool()
            rows = [row[m] for row, m in zip(ids.to("cpu"), keep)]
        else:
            rows = list(ids.to("cpu"))
    else:
        if mask is not None:
            raise ValueError(f"a {name} mask only applies to {name} given as a 2-D tensor")
        if isinstance(ids, (str, bytes)) or not isinstance(ids, Sequence):
            raise TypeError(f"{name} must be a list of token-id sequences or a 2-D tensor, got {type(ids).__name__}")
        rows = []
        for i, row in enumerate(ids):
            if not isinstance(row, torch.Tensor):
                if isinstance(row, (str, bytes)) or not hasattr(row, "__len__"):
                    raise TypeError(f"{name}[{i}] must be a sequence of token ids, got {type(row).__name__}")
                try:
                    # dtype inferred, not forced: floats must be refused, not truncated to ints.
                    row = torch.as_tensor(row) if len(row) else torch.zeros(0, dtype=torch.long)
                except (TypeError, ValueError, RuntimeError) as err:
                    raise TypeError(f"{name}[{i}] must hold integer token ids ({err})") from None
            if row.dim() != 1:
                raise ValueError(f"{name}[{i}] must be one sequence (1-D), got shape {tuple(row.shape)}")
            rows.append(row.to("cpu"))
    out = []
    for i, row in enumerate(rows):
        if row.is_floating_point() or row.is_complex() or row.dtype == torch.bool:
            raise TypeError(f"{name}[{i}] must hold integer token ids, got dtype {row.dtype}")
        row = row.long()
        if row.numel() == 0 and not allow_empty:
            raise ValueError(
                f"{name}[{i}] is empty: a prefix needs at least one token to predict the first completion token"
            )
        if row.numel():
            low, high = int(row.min()), int(row.max())
            if low < 0 or high >= vocab_size:
                bad = low if low < 0 else high
                raise ValueError(f"{name}[{i}] holds token id {bad}, outside the model's vocabulary [0, {vocab_size})")
        out.append(row)
    return out


def placeholder_rows(
    placeholder_ids: Any, default: list[int] | None, batch: int, vocab_size: int
) -> list[torch.Tensor]:
    """One placeholder per completion: the scorer's ``default``, one override for all, or one per completion."""
    if placeholder_ids is None:
        if default is None:
            raise ValueError("no placeholder prompt: pass placeholder_ids (the scorer was built without one)")
        single = torch.tensor(default, dtype=torch.long)
        return [single] * batch
    is_single = (isinstance(placeholder_ids, torch.Tensor) and placeholder_ids.dim() == 1) or (
        isinstance(placeholder_ids, Sequence)
        and len(placeholder_ids) > 0
        and not isinstance(placeholder_ids[0], (Sequence, torch.Tensor))
    )
    if is_single:
        single = as_sequences([placeholder_ids], None, "placeholder_ids", allow_empty=False, vocab_size=vocab_size)[0]
        return [single] * batch
    rows = as_sequences(placeholder_ids, None, "placeholder_ids", allow_empty=False, vocab_size=vocab_size)
    if len(rows) != batch:
        raise ValueError(f"got {len(rows)} placeholder prompts for {batch} completions")
    return rows


def cond_nll_from_logprobs(
    cond_logprobs: Any,
    completions: list[torch.Tensor],
    completion_mask: torch.Tensor | None,
) -> torch.Tensor:
    """Mean NLL per completion from the caller's per-token log-probs (see :meth:`sarkern.SARScorer.score`)."""
    batch = len(completions)
    if isinstance(cond_logprobs, torch.Tensor):
        if cond_logprobs.dim() != 2 or cond_logprobs.shape[0] != batch:
            raise ValueError(
                f"cond_logprobs as a tensor must be [batch={batch}, length], got shape {tuple(cond_logprobs.shape)}"
            )
        lp = cond_logprobs.detach().to("cpu", torch.float64)
        if completion_mask is not None:
            if completion_mask.shape != cond_logprobs.shape:
                raise ValueError(
                    f"cond_logprobs {tuple(cond_logprobs.shape)} and completion_mask "
                    f"{tuple(completion_mask.shape)} must have the same shape"
                )
            keep = completion_mask.to("cpu").bool()
            rows = [lp[i][keep[i]] for i in range(batch)]
        else:
            if lp.shape[1] < max((len(c) for c in completions), default=0):
                raise ValueError(
                    f"cond_logprobs has {lp.shape[1]} columns, fewer than the longest completion "
                    f"({max(len(c) for c in completions)} tokens)"
                )
            rows = [lp[i, : len(completions[i])] for i in range(batch)]
    elif isinstance(cond_logprobs, Sequence) and not isinstance(cond_logprobs, (str, bytes)):
        if len(cond_logprobs) != batch:
            raise ValueError(f"got cond_logprobs for {len(cond_logprobs)} completions, expected {batch}")
        rows = [torch.as_tensor(r).detach().to("cpu", torch.float64).reshape(-1) for r in cond_logprobs]
    else:
        raise TypeError(
            f"cond_logprobs must be a 2-D tensor or a list of 1-D tensors, got {type(cond_logprobs).__name__}"
        )
    nll = torch.full((batch,), math.nan, dtype=torch.float64)
    for i, (row, completion) in enumerate(zip(rows, completions)):
        if row.numel() != completion.numel():
            raise ValueError(
                f"cond_logprobs[{i}] has {row.numel()} log-probs for a completion of {completion.numel()} tokens"
            )
        if row.numel() == 0:
            continue
        if bool(torch.isnan(row).any()) or bool((row > 1e-4).any()):
            raise ValueError(f"cond_logprobs[{i}] must hold log-probabilities (<= 0, not NaN)")
        nll[i] = -row.mean()
    return nll.to(torch.float32)
