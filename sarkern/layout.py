"""The packed layout of one shared-prefix forward: which rows attend to which (a module below the attention
backends, so that :mod:`sarkern.attention` and :mod:`sarkern.flex` both build on it without importing each other)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

import torch

__all__ = [
    "ATTENTION_BACKENDS",
    "DEFAULT_MAX_MASK_ELEMENTS",
    "LAYOUT_KWARG",
    "AttentionBackend",
    "AttentionSegment",
    "PackedLayout",
]

# The keyword argument of the backbone's forward the layout travels under, down to the shared-prefix attention.
LAYOUT_KWARG = "sarkern_layout"

AttentionBackend = Literal["auto", "flash", "flex", "sdpa"]
ATTENTION_BACKENDS = ("auto", "flash", "flex", "sdpa")

# Default bound on one boolean mask block of the SDPA path (rows x keys): 16 Mi elements = 16 MiB.
DEFAULT_MAX_MASK_ELEMENTS = 1 << 24


@dataclass(frozen=True)
class AttentionSegment:
    """Queries = packed rows ``[query_start, query_start + query_len)``; keys = packed rows
    ``[prefix_start, prefix_start + prefix_len)`` followed by the query rows themselves."""

    query_start: int
    query_len: int
    prefix_start: int = 0
    prefix_len: int = 0


@dataclass
class PackedLayout:
    """How the rows of one packed forward attend to each other.

    ``segments`` must tile the packed rows ``[0, total_len)`` in order with their query blocks (segments with no
    queries are allowed and skipped). Device-side metadata for the flash backend and the backends' cached objects
    (:attr:`backend_cache`: the flex backend's block masks) are built lazily, once per layout (the scorer makes one
    layout per pass), and cached.
    """

    segments: tuple[AttentionSegment, ...]
    total_len: int
    backend: AttentionBackend = "auto"
    max_mask_elements: int = DEFAULT_MAX_MASK_ELEMENTS
    _flash_meta: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]] = field(
        default_factory=dict, repr=False
    )
    # Per-layout caches of the backends (e.g. FlexAttention block masks per device and window), built once a pass.
    backend_cache: dict[Any, Any] = field(default_factory=dict, repr=False)
    # How many attention layers ran on this layout (the scorer's verification checks that the model's attention
    # dispatches here at all).
    calls: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        row = 0
        for seg in self.segments:
            if seg.query_start != row or seg.query_len < 0 or seg.prefix_len < 0:
                raise ValueError(f"segments must tile the packed rows in order; bad segment {seg} at row {row}")
            if seg.prefix_len and seg.prefix_start + seg.prefix_len > seg.query_start:
                raise ValueError(f"the prefix of {seg} must come before its queries")
            row += seg.query_len
        if row != self.total_len:
            raise ValueError(f"segments cover {row} rows, the packed sequence has {self.total_len}")
        if self.backend not in ATTENTION_BACKENDS:
            raise ValueError(f"unknown attention backend {self.backend!r}; use one of {', '.join(ATTENTION_BACKENDS)}")

    def flash_metadata(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
        """(key_index, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k) for ``flash_attn_varlen_func``."""
        if device not in self._flash_meta:
            key_index, cu_q, cu_k = [], [0], [0]
            max_q = max_k = 0
            for seg in self.segments:
                if seg.query_len == 0:
                    continue
                key_index.append(torch.arange(seg.prefix_start, seg.prefix_start + seg.prefix_len))
                key_index.append(torch.arange(seg.query_start, seg.query_start + seg.query_len))
                cu_q.append(cu_q[-1] + seg.query_len)
                cu_k.append(cu_k[-1] + seg.prefix_len + seg.query_len)
                max_q = max(max_q, seg.query_len)
                max_k = max(max_k, seg.prefix_len + seg.query_len)
            self._flash_meta[device] = (
                torch.cat(key_index).to(device),
                torch.tensor(cu_q, dtype=torch.int32, device=device),
                torch.tensor(cu_k, dtype=torch.int32, device=device),
                max_q,
                max_k,
            )
        return self._flash_meta[device]
