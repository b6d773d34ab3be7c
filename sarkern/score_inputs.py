"""Input handling of :meth:`sarkern.SARScorer.score`: token-id batches (lists or padded tensors with masks),
placeholder prompts and the caller's conditioned log-probs, checked and turned into 1-D int64 CPU tensors."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

__all__ = [
    "BatchIds",
    "IdsLike",
    "as_sequences",
    "TOKENS_AFTER_EOS_RULES",
    "checked_mask",
    "cond_nll_from_logprobs",
    "cut_after_first_eos",
    "eos_ids_of",
    "placeholder_rows",
    "undeclared_padding_id",
]

IdsLike = Sequence[int] | torch.Tensor
BatchIds = Sequence[IdsLike] | torch.Tensor

# What score() does with tokens after a completion's first EOS: "cut" them (the official SAR code and TRL never count
# them: generation ended there, what follows is padding or garbage) or "raise".
TOKENS_AFTER_EOS_RULES = ("cut", "raise")


def eos_ids_of(model: Any, tokenizer: Any) -> list[int]:
    """The ids that end a completion, as TRL's GRPOTrainer takes them: the model's ``generation_config.eos_token_id``
    (one id or several) and the tokenizer's ``eos_token_id``."""
    ids: list[int] = []
    generation = getattr(model, "generation_config", None)
    for source in (getattr(generation, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        for token in [source] if isinstance(source, int) else list(source or ()):
            if isinstance(token, int) and not isinstance(token, bool) and token not in ids:
                ids.append(token)
    return ids


def cut_after_first_eos(
    completions: list[torch.Tensor], eos_ids: Sequence[int], rule: str
) -> tuple[list[torch.Tensor], list[int]]:
    """Each completion up to and including its first EOS (``rule="cut"``), or ``ValueError`` naming the first
    completion with tokens after its EOS (``rule="raise"``). Returns the completions and their kept lengths.

    Padding is removed before this (masks, unpadded lists), so what is left after an EOS is text the caller passed:
    with ``pad == eos`` and no mask, trailing pads are such tokens and are cut too."""
    if not eos_ids:
        return completions, [len(c) for c in completions]
    eos = torch.tensor(list(eos_ids), dtype=torch.long)
    out = []
    for i, completion in enumerate(completions):
        hits = torch.isin(completion, eos).nonzero()
        end = int(hits[0]) + 1 if hits.numel() else len(completion)
        if end < len(completion) and rule == "raise":
            raise ValueError(
                f"completion_ids[{i}] has {len(completion) - end} tokens after its first EOS (id "
                f"{int(completion[end - 1])} at position {end - 1}): they were never generated as part of the answer; "
                "pass completions cut after their first EOS, or build the scorer with tokens_after_eos='cut'"
            )
        out.append(completion[:end])
    return out, [len(c) for c in out]


def undeclared_padding_id(tokenizer: Any) -> int | None:
    """The tokenizer's pad id when it can only mean padding, else None (no tokenizer, no pad token).

    A pad id that is also the EOS or BOS id (Llama 3 and many fine-tunes set ``pad = eos``) is a real token at the
    end or start of a sequence too, so it cannot tell padding from text: such inputs are taken as given.
    """
    pad = getattr(tokenizer, "pad_token_id", None)
    also_text = (getattr(tokenizer, "eos_token_id", None), getattr(tokenizer, "bos_token_id", None))
    if not isinstance(pad, int) or pad in also_text:
        return None
    return pad


def checked_mask(mask: Any, shape: torch.Size, name: str) -> torch.Tensor:
    """``mask`` as a bool CPU tensor, refused unless it holds only 0/1 (bool, integer or float) and selects one
    contiguous run of tokens per row (padding at the ends only: a hole would join tokens that were never adjacent)."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{name} must be a tensor of 0/1 values, got {type(mask).__name__}")
    if mask.shape != shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, but the ids it masks have {tuple(shape)}")
    mask = mask.detach().to("cpu")
    if mask.dtype == torch.bool:
        keep = mask
    elif mask.is_complex():
        raise TypeError(f"{name} must hold 0/1 values, got dtype {mask.dtype}")
    else:
        bad = (mask != 0) & (mask != 1)  # NaN included
        if bool(bad.any()):
            row, col = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"{name}[{row}, {col}] is {mask[row, col].item()!r}: a mask holds 0 (padding) or 1 (token), "
                "as booleans or numbers; weights are not masks"
            )
        keep = mask == 1
    if keep.dim() == 2 and keep.shape[1] > 1:
        runs = keep[:, :1].long() + (keep[:, 1:] & ~keep[:, :-1]).long().sum(dim=1, keepdim=True)
        broken = (runs.squeeze(1) > 1).nonzero()
        if broken.numel():
            row = int(broken[0])
            selected = keep[row].nonzero().squeeze(1)
            hole = int(next(c for c in range(int(selected[0]), int(selected[-1])) if not keep[row, c]))
            raise ValueError(
                f"{name} row {row} has a hole at column {hole}: a mask must select one contiguous run of tokens per "
                "row (padding at the start or end only); score the pieces as separate sequences"
            )
    return keep


def _refuse_undeclared_padding(ids: torch.Tensor, pad_token_id: int | None, name: str) -> None:
    """A 2-D tensor without a mask whose rows start or end with the pad id is padded: scoring the pads as tokens
    would change every perplexity, so the caller must say where the tokens are."""
    if pad_token_id is None or ids.numel() == 0:
        return
    padded = (ids[:, 0] == pad_token_id) | (ids[:, -1] == pad_token_id)
    if bool(padded.any()):
        row = int(padded.nonzero()[0])
        mask_name = name.replace("_ids", "_mask")
        raise ValueError(
            f"{name} row {row} starts or ends with the pad token id {pad_token_id}: a padded 2-D tensor needs "
            f"{mask_name} (1 = token, 0 = padding), or pass the rows as a list of unpadded sequences"
        )


def as_sequences(
    ids: BatchIds,
    mask: torch.Tensor | None,
    name: str,
    *,
    allow_empty: bool,
    vocab_size: int,
    tokenizer: Any = None,
) -> list[torch.Tensor]:
    """A batch of id sequences (list of lists / 1-D tensors, or a 2-D tensor with an optional 0/1 mask) as a list of
    1-D int64 CPU tensors, checked against the vocabulary.

    ``tokenizer``: a 2-D tensor without a mask whose rows start or end with its pad id is refused as padded (unless
    that id is also EOS or BOS, see :func:`undeclared_padding_id`). Otherwise an unmasked 2-D tensor is taken
    whole, every column a token.
    """
    if isinstance(ids, torch.Tensor):
        if ids.dim() != 2:
            raise ValueError(f"{name} as a tensor must be 2-D [batch, length], got shape {tuple(ids.shape)}")
        if mask is not None:
            keep = checked_mask(mask, ids.shape, name.replace("_ids", "_mask"))
            rows = [row[m] for row, m in zip(ids.to("cpu"), keep)]
        else:
            _refuse_undeclared_padding(ids.to("cpu"), undeclared_padding_id(tokenizer), name)
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
    kept_lengths: Sequence[int] | None = None,
) -> torch.Tensor:
    """Mean NLL per completion from the caller's per-token log-probs (see :meth:`sarkern.SARScorer.score`), one per
    token of ``completions`` as given; ``kept_lengths``: the mean over each one's first tokens only (the completion
    cut after its first EOS)."""
    batch = len(completions)
    if isinstance(cond_logprobs, torch.Tensor):
        if cond_logprobs.dim() != 2 or cond_logprobs.shape[0] != batch:
            raise ValueError(
                f"cond_logprobs as a tensor must be [batch={batch}, length], got shape {tuple(cond_logprobs.shape)}"
            )
        lp = cond_logprobs.detach().to("cpu", torch.float64)
        if completion_mask is not None:
            if isinstance(completion_mask, torch.Tensor) and completion_mask.shape != cond_logprobs.shape:
                raise ValueError(
                    f"cond_logprobs {tuple(cond_logprobs.shape)} and completion_mask "
                    f"{tuple(completion_mask.shape)} must have the same shape"
                )
            keep = checked_mask(completion_mask, cond_logprobs.shape, "completion_mask")
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
        if kept_lengths is not None:
            row = row[: kept_lengths[i]]
        if row.numel() == 0:
            continue
        if bool(torch.isnan(row).any()) or bool((row > 1e-4).any()):
            raise ValueError(f"cond_logprobs[{i}] must hold log-probabilities (<= 0, not NaN)")
        if bool(torch.isneginf(row).any()):
            # log p = -inf: the sampled token had probability 0 under the caller's computation (a filtered or
            # masked vocabulary), not under the policy at the scorer's temperature; its mean would be infinite.
            token = int(torch.isneginf(row).nonzero()[0])
            raise ValueError(
                f"cond_logprobs[{i}] is -inf at completion token {token}: log-probs must come from the full "
                "softmax at the scorer's temperature (no top-k/top-p filtering); or leave cond_logprobs out"
            )
        nll[i] = -row.mean()
    return nll.to(torch.float32)
