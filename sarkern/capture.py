"""Capturing the policy's own log-probs of the tokens it samples, while transformers' `generate` samples them.

At each decoding step the model computes the logits of the next token from which that token is sampled, so
``log p(a_t | q, a_<t)`` (SAR's conditioned half) is available for free during generation. TRL's transformers path
keeps no log-probs, so :func:`capture_sampling_logprobs` puts a logits processor *before* every other processor of
`generate` (temperature, top-k, top-p, repetition penalty...) and takes ``log_softmax(logits / temperature)`` of the
raw logits: the policy's distribution at the trainer's temperature, not the processed one it samples from. It keeps
one step of log-probs (``[batch, vocab]``) in memory, never ``[steps, batch, vocab]``: each step it gathers, from the
previous step's log-probs, the entry of the token that was sampled (the last column of ``input_ids``).

The numbers come from the cached, left-padded decoding forward rather than from one full forward; how close they are
is measured in ``tests/test_capture.py`` and bounded by :data:`CAPTURE_NLL_BOUNDS`.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn
from transformers import GenerationMixin, LogitsProcessor, LogitsProcessorList

__all__ = ["CAPTURE_NLL_BOUNDS", "CaptureMismatchError", "SamplingLogprobCapture", "capture_sampling_logprobs"]

# Largest difference, in mean NLL per completion (nats), allowed between captured log-probs and a fresh no-grad forward
# of the same precision, by the dtype the policy computes its logits in (the autocast dtype, or the weights' dtype).
# Only these precisions were measured (tests/test_capture.py); under others (fp16) nothing is captured.
# fp32: the two forwards differ only in summation order (cached decoding, padding masks), ~1e-6 per token.
# bf16: each forward rounds its activations and logits to 8 mantissa bits (relative 2^-9 per value), ~1e-2 per token,
# averaging to a few 1e-3 per completion.
CAPTURE_NLL_BOUNDS = {torch.float32: 1e-4, torch.bfloat16: 5e-2}


class CaptureMismatchError(RuntimeError):
    """The captured log-probs do not line up with the generated completions: transformers' or TRL's generation
    internals changed (or the generation ran somewhere the capture could not see)."""


class SamplingLogprobCapture(LogitsProcessor):
    """A logits processor that records ``log p(token | prefix)`` of each sampled token at ``temperature``.

    It must run first (see :func:`capture_sampling_logprobs`) and leaves the scores unchanged.
    """

    def __init__(self, temperature: float = 1.0) -> None:
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature!r}")
        self.temperature = float(temperature)
        self.calls = 0
        self.seconds = 0.0  # host time spent capturing (SAR's cost inside generation)
        self._last: torch.Tensor | None = None  # [batch, vocab] log-probs of the latest step
        self._logprobs: list[torch.Tensor] = []  # per step: [batch] log-prob of the token sampled at that step
        self._tokens: list[torch.Tensor] = []  # per step: [batch] the token sampled at that step

    def _record_sampled(self, tokens: torch.Tensor) -> None:
        self._logprobs.append(self._last.gather(1, tokens[:, None].to(self._last.device)).squeeze(1))
        self._tokens.append(tokens)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        start = time.perf_counter()
        if self._last is not None:
            if input_ids.shape[0] != self._last.shape[0]:
                raise CaptureMismatchError(
                    f"the batch changed from {self._last.shape[0]} to {input_ids.shape[0]} rows during generation"
                )
            self._record_sampled(input_ids[:, -1])  # sampled from the previous step's distribution
        self._last = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        self.calls += 1
        self.seconds += time.perf_counter() - start
        return scores

    def per_completion(self, completion_ids: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """The captured fp32 log-probs of each completion's tokens (CPU tensors), checked token by token against the
        completions `generate` returned (TRL cuts each after its first EOS)."""
        start = time.perf_counter()
        batch = len(completion_ids)
        if self.calls == 0 or self._last is None:
            raise CaptureMismatchError("the sampling log-prob capture saw no generation step")
        if self._last.shape[0] != batch:
            raise CaptureMismatchError(f"captured {self._last.shape[0]} sequences for {batch} completions")
        longest = max((len(c) for c in completion_ids), default=0)
        if longest > self.calls:
            raise CaptureMismatchError(f"a completion has {longest} tokens but only {self.calls} steps were captured")
        recorded = len(self._tokens)  # steps whose sampled token was seen (all but the last)
        logprobs = torch.stack(self._logprobs, 1).cpu() if recorded else torch.zeros(batch, 0)
        tokens = torch.stack(self._tokens, 1).cpu() if recorded else torch.zeros(batch, 0, dtype=torch.long)
        last = self._last
        rows = []
        for i, completion in enumerate(completion_ids):
            completion = torch.as_tensor(list(completion), dtype=torch.long)
            n = len(completion)
            seen = min(n, recorded)
            if not torch.equal(tokens[i, :seen], completion[:seen]):
                raise CaptureMismatchError(f"completion {i} differs from the tokens sampled during generation")
            row = logprobs[i, :seen]
            if n > recorded:  # its last token was sampled at the last captured step
                row = torch.cat([row, last[i, completion[-1]].reshape(1).cpu()])
            rows.append(row.float())
        self.seconds += time.perf_counter() - start
        return rows


def _generation_modules(model: nn.Module) -> list[nn.Module]:
    """Every module of ``model`` that can run `generate` (a PEFT model generates through the model it wraps)."""
    found = [m for m in model.modules() if isinstance(m, GenerationMixin)]
    if not found:
        raise CaptureMismatchError(f"{type(model).__name__} has no transformers generation module to capture from")
    return found


@contextmanager
def capture_sampling_logprobs(model: nn.Module, temperature: float = 1.0) -> Iterator[SamplingLogprobCapture]:
    """Within the block, every `generate` of ``model`` records the log-probs of the tokens it samples, at
    ``temperature``, with a :class:`SamplingLogprobCapture` placed before all of its other logits processors."""
    capture = SamplingLogprobCapture(temperature)
    patched = []
    for module in _generation_modules(model):
        build = module._get_logits_processor  # transformers' (private) builder of the processor list

        def capture_first(*args, _build=build, **kwargs):
            return LogitsProcessorList([capture, *_build(*args, **kwargs)])

        had_own = "_get_logits_processor" in vars(module)
        patched.append((module, had_own, vars(module).get("_get_logits_processor")))
        module._get_logits_processor = capture_first
    try:
        yield capture
    finally:
        for module, had_own, own in patched:
            if had_own:
                module._get_logits_processor = own
            else:
                del module._get_logits_processor
