"""Scoring completions with the Self-Aligned Reward using one packed, padding-free forward per pass.

The paper's way runs the model twice over padded ``[B, prompt + completion]`` batches (once with the real prompts,
once with the placeholder) and materialises full ``[B, S, V]`` logits. :class:`SARScorer` instead

* packs every sequence of a pass into one row with no padding: each distinct prefix (a prompt repeated across a GRPO
  group, and the placeholder) is encoded once, followed by its completions, which attend to the prefix's keys and
  values plus their own (:mod:`sarkern.attention`), with positions continuing after the prefix;
* feeds only what predicts a completion token: the prefix's last hidden state (shared by all its completions)
  predicts the first token, a completion's own hidden states predict the rest, so its last token is never an input;
* turns the hidden states into per-sequence perplexities with one fused :func:`sarkern.sequence_perplexity` call per
  pass, without ever allocating ``[tokens, vocabulary]`` logits.

The results equal those of naive per-sample forwards (``model(prompt + completion).logits`` then ``log_softmax``) up
to floating-point reassociation. Whatever the scorer cannot reproduce exactly it refuses by name
(:class:`UnsupportedModelError`) rather than scoring it wrong.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .attention import (
    ATTENTION_BACKENDS,
    LAYOUT_KWARG,
    AttentionBackend,
    AttentionSegment,
    PackedLayout,
    register_attention,
)
from .ops import check_temperature, sequence_perplexity
from .placeholder import PlaceholderPrompts, is_conversation, validate_placeholder_preset, validate_token_ids
from .sar import sar_reward_from_nll, validate_sar_options
from .sharding import check_whole_parameters, gathered_call

__all__ = [
    "SUPPORTED_MODEL_TYPES",
    "SARScorer",
    "SARScores",
    "SelfAlignedReward",
    "UnsupportedModelError",
]

# Architectures whose forward is verified to be "backbone -> LM head" with attention that goes through transformers'
# AttentionInterface and RoPE positions taken from position_ids (tests/test_scorer.py checks each against naive
# forwards, sliding windows included).
SUPPORTED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})

# Config fields that change the logits or the attention scores beyond what the scorer reproduces.
_UNSUPPORTED_CONFIG_FIELDS = {
    "final_logit_softcapping": "final-logit soft-capping",
    "attn_logit_softcapping": "attention-score soft-capping",
    "logit_scale": "logit scaling",
    "logits_scaling": "logit scaling",
    "output_multiplier_scale": "output scaling",
    "lm_head_multiplier": "LM-head scaling",
}

# RoPE variants that look at the longest position in the batch (or keep state across calls): in a packed batch they
# would not see what a per-sample forward sees.
_UNSUPPORTED_ROPE_TYPES = ("dynamic", "longrope")

DEFAULT_MAX_TOKENS_PER_PASS = 32768

IdsLike = Sequence[int] | torch.Tensor
BatchIds = Sequence[IdsLike] | torch.Tensor


class UnsupportedModelError(NotImplementedError):
    """The model (architecture or configuration) cannot be scored exactly by :class:`SARScorer`."""


@dataclass
class SARScores:
    """Per-completion results of :meth:`SARScorer.score`, one row per completion, on the model's device.

    Attributes:
        reward: fp32 SAR reward (the configured variant).
        ppl_cond: fp32 ``ppl(a | q)``, the completion's perplexity after its prompt.
        ppl_uncond: fp32 ``ppl(a)``, after the placeholder prompt (NaN when ``use_comparison=False``: not computed).
        num_tokens: fp32 number of completion tokens (EOS included) the perplexities average over.
        valid: bool, False for rows that could not be scored (empty completions); their other fields are NaN/0.
    """

    reward: torch.Tensor
    ppl_cond: torch.Tensor
    ppl_uncond: torch.Tensor
    num_tokens: torch.Tensor
    valid: torch.Tensor

    def __len__(self) -> int:
        return self.reward.shape[0]


@dataclass
class _Pair:
    """One sequence to score: completion ``completion`` after prefix number ``prefix``."""

    prefix: int
    completion: int


def _rope_types(config: Any) -> list[str]:
    """Every RoPE type named in the config (``rope_parameters`` may be nested per layer type)."""
    found = []
    for attr in ("rope_parameters", "rope_scaling"):
        params = getattr(config, attr, None)
        stack = [params]
        while stack:
            item = stack.pop()
            if isinstance(item, Mapping):
                for key in ("rope_type", "type"):
                    if isinstance(item.get(key), str):
                        found.append(item[key])
                stack.extend(v for v in item.values() if isinstance(v, Mapping))
    return found


def check_model_supported(model: nn.Module) -> None:
    """Raise :class:`UnsupportedModelError` naming what the scorer cannot reproduce exactly in ``model``."""
    config = getattr(model, "config", None)
    model_name = type(model).__name__
    if config is None:
        raise UnsupportedModelError(
            f"{model_name} has no Hugging Face config; SARScorer needs a transformers causal LM"
        )
    model_type = getattr(config, "model_type", None)
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"SARScorer cannot score {model_name} (model_type {model_type!r}) exactly: only "
            f"{', '.join(sorted(SUPPORTED_MODEL_TYPES))} are verified. Other architectures may compute their logits "
            "or attention differently (soft-capping, scaled logits, attention sinks, non-RoPE positions)."
        )
    for field, what in _UNSUPPORTED_CONFIG_FIELDS.items():
        value = getattr(config, field, None)
        if value is not None and value != 1:
            raise UnsupportedModelError(
                f"{model_name} uses {what} (config.{field}={value!r}), which SARScorer does not reproduce"
            )
    for rope_type in _rope_types(config):
        if any(bad in rope_type for bad in _UNSUPPORTED_ROPE_TYPES):
            raise UnsupportedModelError(
                f"{model_name} uses RoPE type {rope_type!r}, whose frequencies depend on the longest sequence in the "
                "batch; a packed forward would not reproduce per-sample scores"
            )
    if getattr(config, "is_causal", True) is False:
        raise UnsupportedModelError(f"{model_name} is configured as non-causal (config.is_causal=False)")


class SARScorer:
    """Scores completions with the Self-Aligned Reward using the model's current weights.

    Args:
        model: a Hugging Face causal LM (``LlamaForCausalLM``, ``Qwen2ForCausalLM``, ``Qwen3ForCausalLM``,
            ``MistralForCausalLM``); see :data:`SUPPORTED_MODEL_TYPES`. It stays where and how it is (device, dtype,
            training mode and attention implementation are restored after each call).
        tokenizer: builds the placeholder prompt (:func:`sarkern.placeholder.build_placeholder_ids`); may be ``None``
            when ``placeholder_ids`` is given.
        placeholder_ids: explicit token ids of the placeholder prompt (overrides the tokenizer).
        temperature: the logits are divided by it before the softmax (use the sampling temperature of the trainer,
            whose log-probs are taken at that temperature too).
        max_tokens_per_pass: bound on the tokens of one packed forward. Larger batches are split into several
            passes; a completion always stays with its prefix (the prefix is re-encoded in each pass that needs it).
            A single prefix + completion longer than the bound runs alone in its own pass.
        use_log, use_denominator, use_comparison, clip_value: the SAR variant (:func:`sarkern.sar_reward`).
            ``use_comparison=False`` skips the unconditioned half entirely.
        empty_completions: ``"nan"`` (default): an empty completion gets NaN reward and perplexities, 0 tokens and
            ``valid=False`` (TRL treats a NaN reward as "not applicable"); ``"raise"``: ``ValueError``.
        attention_backend: ``"auto"`` (on CUDA: flash-attn varlen with fp16/bf16 when installed, else compiled
            FlexAttention; elsewhere per-segment SDPA), ``"flash"``, ``"flex"`` or ``"sdpa"`` (see
            :mod:`sarkern.attention`).
        chat_template_kwargs: passed to the tokenizer's chat template when building the placeholder.
        placeholder: the placeholder preset when ``placeholder_ids`` is not given: ``"template"`` (the chat template
            with an empty user turn) or ``"paper"`` (the official code's fixed system prompt, an empty user turn).
        autocast_dtype: run the scoring forward under ``torch.autocast(device, autocast_dtype)``, as a trainer with
            mixed precision runs the policy (e.g. ``torch.bfloat16`` for fp32 weights trained with ``bf16=True``).
        forward_context: a callable returning a context manager that every scoring forward runs inside (a trainer
            passes ``accelerator.autocast``, so both SAR halves come from the policy's own precision).
        lm_head_fp32: under autocast, still project onto the vocabulary in fp32 (TRL's ``cast_lm_head_to_fp32``).
            Otherwise, under an enabled autocast, the LM head's inputs are cast to the autocast dtype, as an
            autocast ``nn.Linear`` (and TRL's fused LM head) does.

    Raises:
        UnsupportedModelError: for a model it cannot score exactly, naming the reason.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any = None,
        *,
        placeholder_ids: IdsLike | None = None,
        temperature: float = 1.0,
        max_tokens_per_pass: int = DEFAULT_MAX_TOKENS_PER_PASS,
        use_log: bool = False,
        use_denominator: bool = True,
        use_comparison: bool = True,
        clip_value: float = -1.0,
        empty_completions: Literal["nan", "raise"] = "nan",
        attention_backend: AttentionBackend = "auto",
        chat_template_kwargs: Mapping[str, Any] | None = None,
        placeholder: Literal["template", "paper"] = "template",
        autocast_dtype: torch.dtype | None = None,
        forward_context: Callable[[], AbstractContextManager[Any]] | None = None,
        lm_head_fp32: bool = False,
    ) -> None:
        check_model_supported(model)
        validate_placeholder_preset(placeholder)
        if placeholder_ids is not None and placeholder != "template":
            raise ValueError(f"pass either placeholder_ids or placeholder={placeholder!r}, not both")
        floating = isinstance(autocast_dtype, torch.dtype) and autocast_dtype.is_floating_point
        if autocast_dtype is not None and not floating:
            raise ValueError(f"autocast_dtype must be a floating-point torch.dtype, got {autocast_dtype!r}")
        if forward_context is not None and not callable(forward_context):
            raise TypeError("forward_context must be a callable that returns a context manager")
        validate_sar_options(
            use_log=use_log, use_denominator=use_denominator, use_comparison=use_comparison, clip_value=clip_value
        )
        temperature = check_temperature(temperature)  # any real number type (numpy scalars too), fp32-safe
        if isinstance(max_tokens_per_pass, bool) or not isinstance(max_tokens_per_pass, int) or max_tokens_per_pass < 1:
            raise ValueError(f"max_tokens_per_pass must be a positive int, got {max_tokens_per_pass!r}")
        if empty_completions not in ("nan", "raise"):
            raise ValueError(f"empty_completions must be 'nan' or 'raise', got {empty_completions!r}")
        if attention_backend not in ATTENTION_BACKENDS:
            raise ValueError(
                f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {attention_backend!r}"
            )

        self.model = model
        self.tokenizer = tokenizer
        self.temperature = float(temperature)
        self.max_tokens_per_pass = max_tokens_per_pass
        self.sar_options = {
            "use_log": use_log,
            "use_denominator": use_denominator,
            "use_comparison": use_comparison,
            "clip_value": clip_value,
        }
        self.empty_completions = empty_completions
        self.attention_backend = attention_backend
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.autocast_dtype = autocast_dtype
        self.forward_context = forward_context
        self.lm_head_fp32 = bool(lm_head_fp32)

        self.backbone = self._find_backbone(model)
        head = model.get_output_embeddings()
        if not isinstance(head, nn.Linear):
            raise UnsupportedModelError(
                f"{type(model).__name__}'s output embeddings are {type(head).__name__}, not an nn.Linear LM head"
            )
        self.lm_head: nn.Linear = head
        embeddings = model.get_input_embeddings()
        self.vocab_size = min(int(embeddings.num_embeddings), int(head.out_features))  # a ZeRO-3 weight has shape (0,)
        self.max_positions: int | None = getattr(model.config, "max_position_embeddings", None)
        self._attention_name = register_attention()

        # The placeholder of each prompt (PlaceholderPrompts.for_prompts); `placeholder_ids` is the default one.
        self.placeholder_prompts: PlaceholderPrompts | None = None
        if placeholder_ids is not None:
            self.placeholder_ids = validate_token_ids(
                placeholder_ids, name="placeholder_ids", vocab_size=self.vocab_size
            )
            self.placeholder_prompts = PlaceholderPrompts(tokenizer, placeholder_ids=self.placeholder_ids)
        elif tokenizer is not None:
            self.placeholder_prompts = PlaceholderPrompts(
                tokenizer, preset=placeholder, chat_template_kwargs=self.chat_template_kwargs
            )
            self.placeholder_ids = self.placeholder_prompts.default
            validate_token_ids(self.placeholder_ids, name="the placeholder prompt", vocab_size=self.vocab_size)
        elif use_comparison:
            raise ValueError("SARScorer needs a tokenizer or placeholder_ids to build the placeholder prompt")
        else:
            self.placeholder_ids = None

    # ------------------------------------------------------------------------------------------------ model plumbing

    @staticmethod
    def _find_backbone(model: nn.Module) -> nn.Module:
        backbone = None
        get_decoder = getattr(model, "get_decoder", None)
        if callable(get_decoder):
            backbone = get_decoder()
        if backbone is None or backbone is model:
            backbone = getattr(model, "model", None)
        if not isinstance(backbone, nn.Module):
            raise UnsupportedModelError(f"cannot find the decoder backbone of {type(model).__name__}")
        return backbone

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def _configs(self) -> list[Any]:
        configs = []
        for module in (self.model, self.backbone):
            config = getattr(module, "config", None)
            if config is not None and all(config is not c for c in configs):
                configs.append(config)
        return configs

    @contextmanager
    def _scoring_mode(self) -> Iterator[None]:
        """No gradients, dropout off, the shared-prefix attention on, the caller's precision (autocast) and context;
        everything restored afterwards."""
        training = [(module, module.training) for module in self.model.modules()]
        attn = [(config, config._attn_implementation) for config in self._configs()]
        try:
            self.model.eval()
            for config, _ in attn:
                config._attn_implementation = self._attention_name
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

    # ---------------------------------------------------------------------------------------------- input handling

    def _sequences(self, ids: BatchIds, mask: torch.Tensor | None, name: str, allow_empty: bool) -> list[torch.Tensor]:
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
                raise TypeError(
                    f"{name} must be a list of token-id sequences or a 2-D tensor, got {type(ids).__name__}"
                )
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
                if low < 0 or high >= self.vocab_size:
                    bad = low if low < 0 else high
                    raise ValueError(
                        f"{name}[{i}] holds token id {bad}, outside the model's vocabulary [0, {self.vocab_size})"
                    )
            out.append(row)
        return out

    def _placeholders(self, placeholder_ids: Any, batch: int) -> list[torch.Tensor]:
        """One placeholder per completion: the scorer's, one override for all, or one per completion."""
        if placeholder_ids is None:
            if self.placeholder_ids is None:
                raise ValueError("no placeholder prompt: pass placeholder_ids (the scorer was built without one)")
            single = torch.tensor(self.placeholder_ids, dtype=torch.long)
            return [single] * batch
        is_single = (isinstance(placeholder_ids, torch.Tensor) and placeholder_ids.dim() == 1) or (
            isinstance(placeholder_ids, Sequence)
            and len(placeholder_ids) > 0
            and not isinstance(placeholder_ids[0], (Sequence, torch.Tensor))
        )
        if is_single:
            single = self._sequences([placeholder_ids], None, "placeholder_ids", allow_empty=False)[0]
            return [single] * batch
        rows = self._sequences(placeholder_ids, None, "placeholder_ids", allow_empty=False)
        if len(rows) != batch:
            raise ValueError(f"got {len(rows)} placeholder prompts for {batch} completions")
        return rows

    def _cond_nll_from_logprobs(
        self,
        cond_logprobs: Any,
        completions: list[torch.Tensor],
        completion_mask: torch.Tensor | None,
    ) -> torch.Tensor:
        """Mean NLL per completion from the caller's per-token log-probs (see :meth:`score`)."""
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

    # ---------------------------------------------------------------------------------------------------- scoring

    def score(
        self,
        prompt_ids: BatchIds,
        completion_ids: BatchIds,
        *,
        cond_logprobs: torch.Tensor | Sequence[Any] | None = None,
        placeholder_ids: Any = None,
        prompt_mask: torch.Tensor | None = None,
        completion_mask: torch.Tensor | None = None,
    ) -> SARScores:
        """SAR of each completion after its prompt.

        Args:
            prompt_ids: one prompt per completion (a GRPO group repeats its prompt; repeats are encoded once), as a
                list of token-id sequences or a 2-D tensor (with ``prompt_mask`` when it is padded, left or right).
            completion_ids: the completions, EOS included if generated; same forms (``completion_mask`` for padding).
            cond_logprobs: optional per-token ``log p(a_t | q, a_<t)`` at the scorer's temperature, from the current
                weights, to skip the conditioned half. Either a list of 1-D tensors (one log-prob per completion
                token), or a 2-D tensor ``[batch, L]``: with ``completion_mask`` of the same shape its masked entries
                are used (a GRPO trainer's per-token log-probs and completion mask); otherwise the first
                ``len(completion_i)`` entries of row ``i``.
            placeholder_ids: overrides the scorer's placeholder prompt: one sequence for all completions, or one per
                completion (e.g. to keep each prompt's system message).
            prompt_mask, completion_mask: 0/1 masks selecting the tokens of padded 2-D inputs.

        Returns:
            :class:`SARScores`, one row per completion.

        Raises:
            ValueError: prompt and completion counts differ, an empty prompt, a token id outside the vocabulary, a
                prefix + completion longer than the model's ``max_position_embeddings``, malformed ``cond_logprobs``,
                or (with ``empty_completions="raise"``) an empty completion.
        """
        check_whole_parameters(self.model)  # never a sharded LM head read as whole (sarkern.sharding)
        prompts = self._sequences(prompt_ids, prompt_mask, "prompt_ids", allow_empty=False)
        completions = self._sequences(completion_ids, completion_mask, "completion_ids", allow_empty=True)
        batch = len(completions)
        if len(prompts) != batch:
            raise ValueError(f"got {len(prompts)} prompts and {batch} completions; pass one prompt per completion")
        use_comparison = self.sar_options["use_comparison"]
        placeholders = self._placeholders(placeholder_ids, batch) if use_comparison else []

        lengths = torch.tensor([len(c) for c in completions], dtype=torch.long)
        valid = lengths > 0
        if self.empty_completions == "raise" and not bool(valid.all()):
            raise ValueError(f"completion_ids[{int((~valid).nonzero()[0])}] is empty; there is nothing to score")
        self._check_lengths(prompts, completions, "prompt")
        if use_comparison:
            self._check_lengths(placeholders, completions, "placeholder prompt")

        nan = torch.full((batch,), math.nan, dtype=torch.float32)
        cond_given = cond_logprobs is not None
        if cond_given:  # checked before any forward runs
            nll_cond = self._cond_nll_from_logprobs(cond_logprobs, completions, completion_mask)
        ppl_cond = ppl_uncond = nan
        if not cond_given or use_comparison:  # a forward is needed for at least one half
            ppl_c, ppl_u = self._perplexities(
                None if cond_given else prompts, placeholders if use_comparison else None, completions, valid
            )
            ppl_cond = nan if ppl_c is None else ppl_c
            ppl_uncond = nan if ppl_u is None else ppl_u
        if cond_given:
            ppl_cond = torch.where(valid, torch.exp(nll_cond), nan)
        reward = sar_reward_from_nll(
            torch.log(ppl_cond), torch.log(ppl_uncond) if use_comparison else None, **self.sar_options
        ).float()
        device = self.device
        return SARScores(
            reward=reward.to(device),
            ppl_cond=ppl_cond.to(device),
            ppl_uncond=ppl_uncond.to(device),
            num_tokens=lengths.float().to(device),
            valid=valid.to(device),
        )

    def _check_lengths(self, prefixes: list[torch.Tensor], completions: list[torch.Tensor], what: str) -> None:
        if self.max_positions is None:
            return
        for i, (prefix, completion) in enumerate(zip(prefixes, completions)):
            total = len(prefix) + len(completion)
            if total > self.max_positions:
                raise ValueError(
                    f"{what} {i} + completion {i} is {total} tokens, more than the model's "
                    f"max_position_embeddings ({self.max_positions})"
                )

    def _perplexities(
        self,
        prompts: list[torch.Tensor] | None,
        placeholders: list[torch.Tensor] | None,
        completions: list[torch.Tensor],
        valid: torch.Tensor,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Conditioned and/or unconditioned perplexities of every non-empty completion, in packed passes."""
        batch = len(completions)
        prefixes: list[torch.Tensor] = []
        prefix_index: dict[tuple[int, ...], int] = {}
        pairs: list[_Pair] = []
        halves = [h for h in (prompts, placeholders) if h is not None]
        for half in halves:
            for i, prefix in enumerate(half):
                if not bool(valid[i]):
                    continue
                key = tuple(prefix.tolist())
                if key not in prefix_index:
                    prefix_index[key] = len(prefixes)
                    prefixes.append(prefix)
                pairs.append(_Pair(prefix_index[key], i))

        ppl = torch.full((len(pairs),), math.nan, dtype=torch.float32)
        with self._scoring_mode():
            for pass_pairs in self._plan_passes(pairs, prefixes, completions):
                ppl[pass_pairs] = self._run_pass([pairs[j] for j in pass_pairs], prefixes, completions).float().cpu()

        out: list[torch.Tensor | None] = []
        offset = 0
        valid_rows = valid.nonzero().squeeze(1)
        for half in (prompts, placeholders):
            if half is None:
                out.append(None)
                continue
            values = torch.full((batch,), math.nan, dtype=torch.float32)
            count = len(valid_rows)
            values[valid_rows] = ppl[offset : offset + count]
            offset += count
            out.append(values)
        return out[0], out[1]

    def _plan_passes(
        self, pairs: list[_Pair], prefixes: list[torch.Tensor], completions: list[torch.Tensor]
    ) -> list[list[int]]:
        """Split pair indices into passes of at most ``max_tokens_per_pass`` packed tokens (greedy, in order of
        prefix). A prefix costs its length once per pass it appears in; a completion costs its length minus one."""
        by_prefix: dict[int, list[int]] = {}
        for j, pair in enumerate(pairs):
            by_prefix.setdefault(pair.prefix, []).append(j)
        passes: list[list[int]] = []
        current: list[int] = []
        used = 0
        for prefix, members in by_prefix.items():
            prefix_in_pass = False
            for j in members:
                cost = len(completions[pairs[j].completion]) - 1 + (0 if prefix_in_pass else len(prefixes[prefix]))
                if current and used + cost > self.max_tokens_per_pass:
                    passes.append(current)
                    current, used, prefix_in_pass = [], 0, False
                    cost = len(completions[pairs[j].completion]) - 1 + len(prefixes[prefix])
                current.append(j)
                used += cost
                prefix_in_pass = True
        if current:
            passes.append(current)
        return passes

    def _run_pass(
        self, pairs: list[_Pair], prefixes: list[torch.Tensor], completions: list[torch.Tensor]
    ) -> torch.Tensor:
        """Perplexity of each pair of one pass: one packed backbone forward, one ``sequence_perplexity`` call."""
        tokens: list[torch.Tensor] = []
        positions: list[torch.Tensor] = []
        segments: list[AttentionSegment] = []
        predict_rows: list[torch.Tensor] = []  # packed row whose hidden state predicts each target
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
            n = len(completion) - 1  # the last completion token predicts nothing we need
            tokens.append(completion[:n])
            positions.append(torch.arange(p, p + n))
            segments.append(AttentionSegment(query_start=row, query_len=n, prefix_start=start, prefix_len=p))
            predict_rows.append(torch.cat([torch.tensor([start + p - 1]), torch.arange(row, row + n)]))
            targets.append(completion)
            segment_ids.append(torch.full((n + 1,), s, dtype=torch.long))
            row += n

        device = self.device
        input_ids = torch.cat(tokens).unsqueeze(0).to(device)
        position_ids = torch.cat(positions).unsqueeze(0).to(device)
        layout = PackedLayout(tuple(segments), total_len=row, backend=self.attention_backend)
        outputs = self.backbone(
            input_ids=input_ids, position_ids=position_ids, use_cache=False, **{LAYOUT_KWARG: layout}
        )
        hidden = outputs[0] if isinstance(outputs, tuple) else outputs.last_hidden_state
        hidden = hidden[0].index_select(0, torch.cat(predict_rows).to(device))
        weight, bias = self.lm_head.weight, self.lm_head.bias
        # Under autocast the policy's LM head multiplies in the autocast dtype (unless it is kept in fp32): do the same,
        # so that ppl(a|q), ppl(a) and the trainer's own log-probs all come from one precision.
        if torch.is_autocast_enabled(device.type) and not self.lm_head_fp32:
            dtype = torch.get_autocast_dtype(device.type)
            hidden, weight = hidden.to(dtype), weight.to(dtype)
            bias = None if bias is None else bias.to(dtype)
        elif self.lm_head_fp32:
            hidden, weight = hidden.float(), weight.float()
            bias = None if bias is None else bias.float()
        return sequence_perplexity(
            hidden,
            weight,
            torch.cat(targets).to(device),
            torch.cat(segment_ids).to(device),
            len(pairs),
            bias=bias,
            temperature=self.temperature,
        )


class SelfAlignedReward:
    """SAR as a TRL reward function: ``reward_funcs=[correctness, SelfAlignedReward(model, tokenizer)]``.

    TRL calls it with the prompts (text, or chat messages for conversational datasets), the decoded completions,
    their token ids and every other dataset column as keyword arguments. The prompts are tokenized the way TRL's
    ``GRPOTrainer`` does (``apply_chat_template(..., add_generation_prompt=True)`` for conversations, the tokenizer
    otherwise), unless a ``prompt_ids`` column/keyword provides the ids. For conversational prompts the placeholder
    keeps each prompt's system (and developer) messages (`placeholder="paper"`: the paper's fixed system prompt
    instead). Give it the model instance the trainer trains, so that SAR uses the current
    policy weights. Empty completions get ``None`` (TRL's "not applicable").

    TRL logs it as ``rewards/sar/...``; when TRL passes ``log_metric``, the mean perplexities are logged as
    ``sar/ppl_cond`` and ``sar/ppl_uncond``.

    Args:
        model, tokenizer: as for :class:`SARScorer`; the tokenizer is required here (prompts arrive as text).
        chat_template_kwargs: the trainer's ``chat_template_kwargs`` (e.g. ``{"enable_thinking": False}``).
        **scorer_kwargs: any other :class:`SARScorer` option (SAR variant, temperature, ``max_tokens_per_pass``...).
    """

    __name__ = "sar"

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        **scorer_kwargs: Any,
    ) -> None:
        if tokenizer is None:
            raise ValueError("SelfAlignedReward needs the tokenizer to turn TRL's prompts into token ids")
        self.tokenizer = tokenizer
        self.chat_template_kwargs = dict(chat_template_kwargs or {})
        self.scorer = SARScorer(model, tokenizer, chat_template_kwargs=self.chat_template_kwargs, **scorer_kwargs)

    def _prompt_ids(self, prompt: Any) -> list[int]:
        if is_conversation(prompt):
            ids = self.tokenizer.apply_chat_template(
                list(prompt), add_generation_prompt=True, tokenize=True, return_dict=False, **self.chat_template_kwargs
            )
            return list(ids["input_ids"] if isinstance(ids, Mapping) else ids)
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt)["input_ids"])
        raise TypeError(f"a prompt must be text or a list of chat messages, got {type(prompt).__name__}")

    def __call__(
        self,
        prompts: Sequence[Any],
        completions: Sequence[Any],
        completion_ids: Sequence[Sequence[int]],
        prompt_ids: Sequence[Sequence[int]] | None = None,
        **kwargs: Any,
    ) -> list[float | None]:
        if len(prompts) != len(completion_ids):
            raise ValueError(f"got {len(prompts)} prompts and {len(completion_ids)} completions")
        if prompt_ids is None:
            cache: dict[str, list[int]] = {}
            prompt_ids = []
            for prompt in prompts:
                key = repr(prompt)  # a GRPO group repeats its prompt: tokenize it once
                if key not in cache:
                    cache[key] = self._prompt_ids(prompt)
                prompt_ids.append(cache[key])
        placeholder_ids = None
        if self.scorer.sar_options["use_comparison"]:
            placeholder_ids = self.scorer.placeholder_prompts.for_prompts(prompts)
        # Inside the parameter gathering of FSDP2 / DeepSpeed ZeRO-3 when the policy is sharded.
        scores = gathered_call(
            self.scorer.model, self.scorer.score, prompt_ids, completion_ids, placeholder_ids=placeholder_ids
        )
        log_metric = kwargs.get("log_metric")
        if callable(log_metric) and bool(scores.valid.any()):
            log_metric("sar/ppl_cond", float(scores.ppl_cond[scores.valid].mean()))
            if self.scorer.sar_options["use_comparison"]:
                log_metric("sar/ppl_uncond", float(scores.ppl_uncond[scores.valid].mean()))
        rewards = scores.reward.tolist()
        return [r if ok else None for r, ok in zip(rewards, scores.valid.tolist())]
