"""The universal scoring path: right-padded, length-bucketed batches through the model's own forward.

For any causal LM, the hidden state of a token depends only on the tokens before it, so padding *after* a sequence
leaves every real token's result as it is in a per-sample forward: the model's own attention (sinks, chunked or
hidden windows, custom attention functions), its own masks, positions and row-index tricks (a right-padded row starts
at row 0, as a sequence alone does), and its recurrent or convolutional state (Gated DeltaNet, Mamba, short
convolutions) all run exactly as they would on the sequence alone. Nothing is assumed about the architecture, so
this path needs no proof; it costs one forward per sequence's own tokens (a shared prefix is recomputed per
completion) instead of the packed path's once per prefix, and the padding of each batch.

Batches hold at most ``max_tokens`` padded tokens (a single longer sequence runs alone); sequences are sorted by
length and a batch pads none of them by more than a quarter of its width, so that padding costs little. For RoPE
whose frequencies depend on the length (longrope, dynamic NTK), each sequence is fed whole, last token included, and
a batch holds one regime only, so the batch's longest position is that of a sequence of the same regime, as in a
per-sample forward.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from .packing import Pair

__all__ = ["MAX_PADDING", "PADDING_SLACK", "PaddedBatch", "build_batch", "plan_batches"]

# A batch pads each sequence by at most this fraction of the batch's width, or PADDING_SLACK tokens.
MAX_PADDING = 0.25
PADDING_SLACK = 8


@dataclass
class PaddedBatch:
    """``input_ids``/``attention_mask`` ``[batch, length]`` (mask ``None`` when nothing is padded);
    ``predict_rows`` ``[targets]``: the flat index into ``[batch * length]`` of the hidden state predicting each
    target; ``targets`` and ``segment_ids`` (the pair each target belongs to, in batch order)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    predict_rows: torch.Tensor
    targets: torch.Tensor
    segment_ids: torch.Tensor
    num_pairs: int

    @property
    def tokens(self) -> int:
        return self.input_ids.numel()


def _fed_length(pair: Pair, prefixes: list[torch.Tensor], completions: list[torch.Tensor], feed_last: bool) -> int:
    return len(prefixes[pair.prefix]) + len(completions[pair.completion]) - (0 if feed_last else 1)


def plan_batches(
    pairs: list[Pair],
    prefixes: list[torch.Tensor],
    completions: list[torch.Tensor],
    max_tokens: int,
    *,
    regime: Callable[[int], Hashable] | None = None,
    feed_last: bool = False,
) -> list[list[int]]:
    """Pair indices in batches of at most ``max_tokens`` padded tokens, longest first, one RoPE regime each; a batch
    also closes when padding would exceed :data:`MAX_PADDING` of its width (lengths spread over a decade give a few
    batches, not one padded to the longest)."""
    by_regime: dict[Hashable, list[int]] = {}
    for j, pair in enumerate(pairs):
        length = len(prefixes[pair.prefix]) + len(completions[pair.completion])
        by_regime.setdefault(None if regime is None else regime(length), []).append(j)
    batches: list[list[int]] = []
    for members in by_regime.values():
        members = sorted(members, key=lambda j: -_fed_length(pairs[j], prefixes, completions, feed_last))
        current: list[int] = []
        for j in members:
            # Sorted longest first: the batch's padded length is its first member's.
            width = _fed_length(pairs[current[0] if current else j], prefixes, completions, feed_last)
            own = _fed_length(pairs[j], prefixes, completions, feed_last)
            padding = width - own
            if current and (
                (len(current) + 1) * width > max_tokens or padding > max(PADDING_SLACK, MAX_PADDING * width)
            ):
                batches.append(current)
                current = []
            current.append(j)
        if current:
            batches.append(current)
    return batches


def build_batch(
    pairs: list[Pair], prefixes: list[torch.Tensor], completions: list[torch.Tensor], *, feed_last: bool = False
) -> PaddedBatch:
    """The right-padded batch of ``pairs`` (non-empty completions), on the CPU."""
    fed = [_fed_length(pair, prefixes, completions, feed_last) for pair in pairs]
    width = max(fed)
    input_ids = torch.zeros(len(pairs), width, dtype=torch.long)  # any in-vocabulary id: masked, and after the tokens
    attention_mask = torch.zeros(len(pairs), width, dtype=torch.long)
    predict_rows, targets, segment_ids = [], [], []
    for s, (pair, length) in enumerate(zip(pairs, fed)):
        prefix, completion = prefixes[pair.prefix], completions[pair.completion]
        sequence = torch.cat([prefix, completion])[:length]
        input_ids[s, :length] = sequence
        attention_mask[s, :length] = 1
        p, n = len(prefix), len(completion)
        predict_rows.append(s * width + torch.arange(p - 1, p - 1 + n))
        targets.append(completion)
        segment_ids.append(torch.full((n,), s, dtype=torch.long))
    return PaddedBatch(
        input_ids=input_ids,
        attention_mask=None if min(fed) == width else attention_mask,
        predict_rows=torch.cat(predict_rows),
        targets=torch.cat(targets),
        segment_ids=torch.cat(segment_ids),
        num_pairs=len(pairs),
    )
