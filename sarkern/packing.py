"""The packed, padding-free layout of the scorer's forwards, and how sequences are split into passes.

One pass is one row (batch size 1)::

    [ prefix_a | completion_1[:-1] | completion_2[:-1] | prefix_b | completion_3[:-1] | ... ]

Each distinct prefix of the pass is encoded once; its completions follow it, with positions continuing after the
prefix and attention to the prefix's rows and their own (:class:`~sarkern.attention.PackedLayout`). The prefix's last
hidden state predicts a completion's first token, the completion's own hidden states predict the rest, so its last
token is fed only when the model's RoPE must see the sequence's full length (``feed_last``).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from .layout import AttentionBackend, AttentionSegment, PackedLayout

__all__ = ["PackedPass", "Pair", "build_pass", "plan_passes"]


@dataclass(frozen=True)
class Pair:
    """One sequence to score: completion number ``completion`` after prefix number ``prefix``."""

    prefix: int
    completion: int


@dataclass
class PackedPass:
    """The inputs of one packed forward and where its targets' predictions come from.

    ``input_ids``/``position_ids`` ``[1, rows]``; ``predict_rows`` ``[targets]``: the packed row whose hidden state
    predicts each target; ``targets`` and ``segment_ids`` (the pair each target belongs to, in pass order), both
    ``[targets]``.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    layout: PackedLayout
    predict_rows: torch.Tensor
    targets: torch.Tensor
    segment_ids: torch.Tensor
    num_pairs: int


def plan_passes(
    pairs: list[Pair],
    prefixes: list[torch.Tensor],
    completions: list[torch.Tensor],
    max_tokens: int,
    *,
    regime: Callable[[int], Hashable] | None = None,
    feed_last: bool = False,
) -> list[list[int]]:
    """Split pair indices into passes of at most ``max_tokens`` packed rows (greedy, grouped by prefix).

    A prefix costs its length once per pass it appears in; a completion its length minus one (or its length with
    ``feed_last``). A single prefix + completion over the bound runs alone. With ``regime`` (a function of the full
    sequence length, :func:`sarkern.model_support.rope_regime`), every pass holds sequences of one regime only.
    """
    groups: dict[tuple[Hashable, int], list[int]] = {}
    for j, pair in enumerate(pairs):
        length = len(prefixes[pair.prefix]) + len(completions[pair.completion])
        key = (None if regime is None else regime(length), pair.prefix)
        groups.setdefault(key, []).append(j)
    # Regimes in order of first appearance, prefixes within them likewise (dicts keep insertion order).
    by_regime: dict[Hashable, list[tuple[int, list[int]]]] = {}
    for (key, prefix), members in groups.items():
        by_regime.setdefault(key, []).append((prefix, members))

    passes: list[list[int]] = []
    for prefix_groups in by_regime.values():
        current: list[int] = []
        used = 0
        for prefix, members in prefix_groups:
            prefix_in_pass = False
            for j in members:
                own = len(completions[pairs[j].completion]) - (0 if feed_last else 1)
                cost = own + (0 if prefix_in_pass else len(prefixes[prefix]))
                if current and used + cost > max_tokens:
                    passes.append(current)
                    current, used = [], 0
                    cost = own + len(prefixes[prefix])
                current.append(j)
                used += cost
                prefix_in_pass = True
        if current:
            passes.append(current)
    return passes


def build_pass(
    pairs: list[Pair],
    prefixes: list[torch.Tensor],
    completions: list[torch.Tensor],
    backend: AttentionBackend,
    *,
    feed_last: bool = False,
) -> PackedPass:
    """The packed row of ``pairs`` (non-empty completions), on the CPU."""
    tokens: list[torch.Tensor] = []
    positions: list[torch.Tensor] = []
    segments: list[AttentionSegment] = []
    predict_rows: list[torch.Tensor] = []
    targets: list[torch.Tensor] = []
    segment_ids: list[torch.Tensor] = []
    row = 0
    prefix_rows: dict[int, tuple[int, int]] = {}  # prefix -> (start row, length) in this pass
    for s, pair in enumerate(pairs):
        if pair.prefix not in prefix_rows:
            prefix = prefixes[pair.prefix]
            p = len(prefix)
            prefix_rows[pair.prefix] = (row, p)
            tokens.append(prefix)
            positions.append(torch.arange(p))
            segments.append(AttentionSegment(query_start=row, query_len=p))
            row += p
        start, p = prefix_rows[pair.prefix]
        completion = completions[pair.completion]
        n = len(completion)
        fed = n if feed_last else n - 1
        tokens.append(completion[:fed])
        positions.append(torch.arange(p, p + fed))
        segments.append(AttentionSegment(query_start=row, query_len=fed, prefix_start=start, prefix_len=p))
        predict_rows.append(torch.cat([torch.tensor([start + p - 1]), torch.arange(row, row + n - 1)]))
        targets.append(completion)
        segment_ids.append(torch.full((n,), s, dtype=torch.long))
        row += fed
    return PackedPass(
        input_ids=torch.cat(tokens).unsqueeze(0),
        position_ids=torch.cat(positions).unsqueeze(0),
        layout=PackedLayout(tuple(segments), total_len=row, backend=backend),
        predict_rows=torch.cat(predict_rows),
        targets=torch.cat(targets),
        segment_ids=torch.cat(segment_ids),
        num_pairs=len(pairs),
    )
