"""The model as one scoring call sees it: its modules resolved now (never cached across calls), the precision and
context its forwards run in, and the three computations both scoring paths are built from.

* :meth:`ScoringModel.packed_hidden`: one packed shared-prefix backbone forward (the fast path, :mod:`sarkern.packing`);
* :meth:`ScoringModel.padded_hidden`: one right-padded batch through the model's own backbone, attention, masks and
  recurrent state (the universal path, :mod:`sarkern.universal`);
* :meth:`ScoringModel.token_logprobs` / :meth:`ScoringModel.perplexities`: the LM head and the model's logit
  transform on hidden states, fused (:func:`sarkern.linear_token_logprobs`) for a plain ``nn.Linear`` head, through
  the head module itself in row chunks otherwise (a PEFT adapter on the head, ``modules_to_save``), never
  ``[tokens, vocabulary]`` logits at once.

Modules are resolved when a :class:`ScoringModel` is made, which the scorer does at every call: a PEFT wrap, a new
head or resized embeddings after the scorer was built are followed, never scored stale.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Callable, Hashable, Iterator
from contextlib import AbstractContextManager, ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from .layout import LAYOUT_KWARG, AttentionBackend
from .model_support import (
    LogitTransform,
    UnsupportedModelError,
    config_value,
    logit_transform,
    rope_regime,
    text_config,
)
from .ops import linear_token_logprobs, sequence_perplexity
from .packing import PackedPass

__all__ = ["ScoringModel", "find_backbone"]

# Logit rows the head module computes at once when it is not a plain nn.Linear (bounded memory: rows x vocabulary).
_HEAD_CHUNK_ELEMENTS = 1 << 24


def find_backbone(model: nn.Module) -> nn.Module:
    """The decoder stack whose last hidden state the LM head reads."""
    backbone = None
    get_decoder = getattr(model, "get_decoder", None)
    if callable(get_decoder):
        backbone = get_decoder()
    if backbone is None or backbone is model:
        backbone = getattr(model, "model", None)
    if not isinstance(backbone, nn.Module):  # older transformers: GPT-2's `transformer`, found by its prefix
        backbone = getattr(model, "base_model", None)
        backbone = None if backbone is model else backbone
    if not isinstance(backbone, nn.Module):
        raise UnsupportedModelError(f"cannot find the decoder backbone of {type(model).__name__}")
    return backbone


def _is_plain_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward


class ScoringModel:
    """``model``'s backbone, LM head and configs as they are now, with the scorer's precision options."""

    def __init__(
        self,
        model: nn.Module,
        *,
        attention_name: str,
        attention_backend: AttentionBackend,
        forward_context: Callable[[], AbstractContextManager[Any]] | None,
        autocast_dtype: torch.dtype | None,
        lm_head_fp32: bool,
    ) -> None:
        self.model = model
        self.backbone = find_backbone(model)
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Module) or not any(True for _ in head.parameters()):
            raise UnsupportedModelError(f"{type(model).__name__} has no LM head module (get_output_embeddings())")
        self.head = head
        self.fused_head = _is_plain_linear(head)
        self.attention_name = attention_name
        self.attention_backend = attention_backend
        self.forward_context = forward_context
        self.autocast_dtype = autocast_dtype
        self.lm_head_fp32 = lm_head_fp32
        embeddings = model.get_input_embeddings()
        sizes = [int(embeddings.num_embeddings)] if hasattr(embeddings, "num_embeddings") else []
        if self.fused_head:
            sizes.append(int(head.out_features))
        if not sizes:
            raise UnsupportedModelError(f"cannot tell the vocabulary size of {type(model).__name__}")
        self.vocab_size = min(sizes)  # a ZeRO-3 weight has shape (0,): read the module's sizes, not the weight's

    # ------------------------------------------------------------------------------------------------- what it is

    @property
    def name(self) -> str:
        return type(self.model).__name__

    @property
    def head_weight(self) -> torch.Tensor:
        return next(self.head.parameters()) if not self.fused_head else self.head.weight

    @property
    def device(self) -> torch.device:
        return self.head_weight.device

    @property
    def text_config(self) -> Any:
        return text_config(self.model.config)

    @property
    def max_positions(self) -> int | None:
        value = config_value(self.text_config, "max_position_embeddings")
        return value if isinstance(value, int) and not isinstance(value, bool) else None

    @property
    def logit_transform(self) -> LogitTransform:
        return logit_transform(self.text_config)

    @property
    def rope_regime(self) -> Callable[[int], Hashable] | None:
        return rope_regime(self.text_config)

    @property
    def feed_last(self) -> bool:
        """Feed each completion's last token when RoPE depends on length, so that a pass's largest position is its
        longest sequence's, as in a per-sample forward."""
        return self.rope_regime is not None

    def configs(self) -> list[Any]:
        """The distinct configs of the model and its backbone (their attention implementation is switched)."""
        configs = []
        for module in (self.model, self.backbone):
            config = getattr(module, "config", None)
            if config is not None and all(config is not c for c in configs):
                configs.append(config)
        return configs

    def fingerprint(self) -> str:
        """What a verdict about this model depends on: configs, module structure (a PEFT wrap changes it), the head,
        dtype, device and the scorer's precision options."""
        structure = hashlib.sha256()
        for name, module in self.model.named_modules():
            structure.update(f"{name}:{type(module).__qualname__};".encode())
        configs = [json.dumps(c.to_dict(), sort_keys=True, default=str) for c in self.configs()]
        weight = self.head_weight
        return json.dumps(
            [
                configs,
                [c._attn_implementation for c in self.configs()],
                structure.hexdigest(),
                self.attention_backend,
                str(weight.dtype),
                str(weight.device),
                str(self.autocast_dtype),
                self.forward_context is not None,
                self.lm_head_fp32,
            ]
        )

    # ----------------------------------------------------------------------------------------------- the context

    @contextmanager
    def scoring_mode(self, shared_prefix: bool) -> Iterator[None]:
        """No gradients, dropout off, the caller's precision (autocast) and context, and (``shared_prefix``) the
        shared-prefix attention on; everything restored afterwards."""
        training = [(module, module.training) for module in self.model.modules()]
        attn = [(config, config._attn_implementation) for config in self.configs()]
        try:
            self.model.eval()
            if shared_prefix:
                for config, _ in attn:
                    config._attn_implementation = self.attention_name
            with torch.no_grad(), ExitStack() as stack:
                if self.forward_context is not None:
                    stack.enter_context(self.forward_context())
                if self.autocast_dtype is not None:
                    stack.enter_context(torch.autocast(self.device.type, dtype=self.autocast_dtype))
                yield
        finally:
            for config, implementation in attn:
                config._attn_implementation = implementation
            for module, was_training in training:
                module.training = was_training

    # ------------------------------------------------------------------------------------------------ the forwards

    @staticmethod
    def _last_hidden(outputs: Any) -> torch.Tensor:
        return outputs[0] if isinstance(outputs, tuple) else outputs.last_hidden_state

    def packed_hidden(self, pack: PackedPass) -> torch.Tensor:
        """One packed shared-prefix backbone forward; the hidden state of every row that predicts a target."""
        device = self.device
        outputs = self.backbone(
            input_ids=pack.input_ids.to(device),
            position_ids=pack.position_ids.to(device),
            use_cache=False,
            **{LAYOUT_KWARG: pack.layout},
        )
        return self._last_hidden(outputs)[0].index_select(0, pack.predict_rows.to(device))

    def padded_hidden(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, rows: torch.Tensor):
        """One right-padded batch through the model's own backbone; hidden states at flat indices ``rows`` of
        ``[batch * length]``."""
        device = self.device
        kwargs = {} if attention_mask is None else {"attention_mask": attention_mask.to(device)}
        outputs = self.backbone(input_ids=input_ids.to(device), use_cache=False, **kwargs)
        hidden = self._last_hidden(outputs)
        return hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows.to(device))

    def per_sample_hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """The backbone's last hidden states of one sequence run alone ``[len, D]`` (the probe's reference)."""
        return self._last_hidden(self.backbone(input_ids=ids.unsqueeze(0).to(self.device), use_cache=False))[0]

    # ------------------------------------------------------------------------------------------------- the LM head

    def _head_operands(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``hidden``, the head's weight and bias in the precision the policy's own LM head multiplies in: under
        autocast the autocast dtype (unless the head is kept in fp32), so that ppl(a|q), ppl(a) and the trainer's
        own log-probs all come from one precision."""
        weight, bias = self.head.weight, self.head.bias
        device_type = self.device.type
        if torch.is_autocast_enabled(device_type) and not self.lm_head_fp32:
            dtype = torch.get_autocast_dtype(device_type)
        elif self.lm_head_fp32:
            dtype = torch.float32
        else:
            return hidden, weight, bias
        return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)

    def _module_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
        """Log-probs through the head module itself, a bounded number of logit rows at a time."""
        transform = self.logit_transform
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        step, start = None, 0
        while start < hidden.shape[0]:
            rows = hidden[start : start + (step or 1)]
            logits = self.head(rows).float() * transform.multiplier
            if step is None:  # the vocabulary is known once the head has run
                step = max(1, _HEAD_CHUNK_ELEMENTS // logits.shape[-1])
            if transform.softcap is not None:
                logits = transform.softcap * torch.tanh(logits / transform.softcap)
            logp = torch.log_softmax(logits / temperature, dim=-1)
            out[start : start + rows.shape[0]] = logp.gather(-1, targets[start : start + rows.shape[0], None]).squeeze(
                1
            )
            start += rows.shape[0]
        return out

    def token_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
        """Per-token log-probs of ``targets`` from hidden states ``[n, D]``, with the model's logit transform."""
        if not self.fused_head:
            return self._module_logprobs(hidden, targets.to(hidden.device), temperature)
        hidden, weight, bias = self._head_operands(hidden)
        # The ids were checked against the vocabulary on input: no device-to-host sync for the op's own check.
        options = self.logit_transform.op_options(temperature)
        return linear_token_logprobs(
            hidden, weight, targets.to(hidden.device), bias=bias, check_inputs=False, **options
        )

    def perplexities(
        self, hidden: torch.Tensor, targets: torch.Tensor, segment_ids: torch.Tensor, count: int, temperature: float
    ) -> torch.Tensor:
        """Perplexity of each of ``count`` segments of ``hidden``'s rows: one fused ``sequence_perplexity`` call."""
        device = hidden.device
        if not self.fused_head:
            logprobs = self._module_logprobs(hidden, targets.to(device), temperature).double()
            segment_ids = segment_ids.to(device)
            sums = torch.zeros(count, dtype=torch.float64, device=device).index_add_(0, segment_ids, logprobs)
            counts = torch.bincount(segment_ids, minlength=count).double()
            return torch.exp(-sums / counts).float() if bool((counts > 0).all()) else torch.full_like(sums, math.nan)
        hidden, weight, bias = self._head_operands(hidden)
        return sequence_perplexity(
            hidden,
            weight,
            targets.to(device),
            segment_ids.to(device),
            count,
            bias=bias,
            check_inputs=False,  # ids checked on input, segment ids built by the scorer
            **self.logit_transform.op_options(temperature),
        )
