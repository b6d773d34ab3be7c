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
to floating-point reassociation. Which models: not an allow-list; the first scoring of a model runs a short probe
that proves this equality on the model itself (:mod:`sarkern.verification`), and whatever the scorer cannot reproduce
exactly it refuses with the cause named (:class:`UnsupportedModelError`) rather than scoring it wrong. Input handling
lives in :mod:`sarkern.score_inputs`, the packed layout and the planning of passes in :mod:`sarkern.packing`, what
is read from the config (traps, logit scaling, soft-caps, length-dependent RoPE) in :mod:`sarkern.model_support`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from .attention import ATTENTION_BACKENDS, LAYOUT_KWARG, AttentionBackend, register_attention
from .model_support import (
    LogitTransform,
    UnsupportedModelError,
    check_config_traps,
    logit_transform,
    rope_regime,
    text_config,
)
from .ops import check_temperature, linear_token_logprobs, sequence_perplexity
from .packing import PackedPass, Pair, build_pass, plan_passes
from .placeholder import PlaceholderPrompts, is_conversation, validate_placeholder_preset, validate_token_ids
from .sar import sar_reward_from_nll, validate_sar_options
from .score_inputs import BatchIds, IdsLike, as_sequences, cond_nll_from_logprobs, placeholder_rows
from .sharding import check_whole_parameters, gathered_call
from .verification import verify_scorer

__all__ = [
    "SARScorer",
    "SARScores",
    "SelfAlignedReward",
    "UnsupportedModelError",
]

DEFAULT_MAX_TOKENS_PER_PASS = 32768


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


class SARScorer:
    """Scores completions with the Self-Aligned Reward using the model's current weights.

    Args:
        model: a Hugging Face causal LM (a PEFT model wrapping one too) whose packed forward reproduces per-sample
            forwards: checked on the model itself by a short probe the first time it scores
            (:mod:`sarkern.verification`), not by its name. It stays where and how it is (device, dtype, training
            mode and attention implementation are restored after each call).
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
        UnsupportedModelError: for a model it cannot score exactly, naming the reason: at construction for known
            config traps (naming the field), at the first :meth:`score` when the probe shows a difference.
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
        check_config_traps(model)
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

    @property
    def text_config(self) -> Any:
        return text_config(self.model.config)

    # What the scorer reads from the config is read on every use, so that it follows config changes (which also
    # make the verification probe run again).

    @property
    def max_positions(self) -> int | None:
        return getattr(self.text_config, "max_position_embeddings", None)

    @property
    def logit_transform(self) -> LogitTransform:
        """Logit scaling and final soft-capping, folded into the fused op's temperature and soft-cap."""
        return logit_transform(self.text_config)

    @property
    def rope_regime(self) -> Callable[[int], Hashable] | None:
        """For RoPE that depends on the sequence length, each pass holds sequences of one regime."""
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

    @contextmanager
    def scoring_mode(self, shared_prefix: bool = True) -> Iterator[None]:
        """No gradients, dropout off, the caller's precision (autocast) and context, and (``shared_prefix``) the
        shared-prefix attention on; everything restored afterwards."""
        training = [(module, module.training) for module in self.model.modules()]
        attn = [(config, config._attn_implementation) for config in self.configs()]
        try:
            self.model.eval()
            if shared_prefix:
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

    # ---------------------------------------------------------------------------------------------- the LM head

    def _head_operands(self, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``hidden``, the head's weight and bias in the precision the policy's own LM head multiplies in: under
        autocast the autocast dtype (unless the head is kept in fp32), so that ppl(a|q), ppl(a) and the trainer's
        own log-probs all come from one precision."""
        weight, bias = self.lm_head.weight, self.lm_head.bias
        device_type = self.device.type
        if torch.is_autocast_enabled(device_type) and not self.lm_head_fp32:
            dtype = torch.get_autocast_dtype(device_type)
        elif self.lm_head_fp32:
            dtype = torch.float32
        else:
            return hidden, weight, bias
        return hidden.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype)

    def head_logprobs(self, hidden: torch.Tensor, targets: torch.Tensor, temperature: float) -> torch.Tensor:
        """Per-token log-probs of ``targets`` from hidden states ``[n, D]``, with the model's logit transform."""
        hidden, weight, bias = self._head_operands(hidden)
        # The ids were checked against the vocabulary on input: no device-to-host sync for the op's own check.
        options = self.logit_transform.op_options(temperature)
        return linear_token_logprobs(hidden, weight, targets, bias=bias, check_inputs=False, **options)

    def _pass_hidden(self, pack: PackedPass) -> torch.Tensor:
        """One packed backbone forward; the hidden state of every row that predicts a target."""
        device = self.device
        outputs = self.backbone(
            input_ids=pack.input_ids.to(device),
            position_ids=pack.position_ids.to(device),
            use_cache=False,
            **{LAYOUT_KWARG: pack.layout},
        )
        hidden = outputs[0] if isinstance(outputs, tuple) else outputs.last_hidden_state
        return hidden[0].index_select(0, pack.predict_rows.to(device))

    def pass_logprobs(self, pack: PackedPass, temperature: float) -> torch.Tensor:
        """Per-token log-probs of every target of one pass (the verification probe's view of a pass)."""
        return self.head_logprobs(self._pass_hidden(pack), pack.targets.to(self.device), temperature)

    def _pass_perplexity(self, pack: PackedPass) -> torch.Tensor:
        """Perplexity of each pair of one pass: one packed backbone forward, one ``sequence_perplexity`` call."""
        hidden, weight, bias = self._head_operands(self._pass_hidden(pack))
        device = self.device
        return sequence_perplexity(
            hidden,
            weight,
            pack.targets.to(device),
            pack.segment_ids.to(device),
            pack.num_pairs,
            bias=bias,
            check_inputs=False,  # ids checked on input, segment ids built here
            **self.logit_transform.op_options(self.temperature),
        )

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
        vocab = self.vocab_size
        prompts = as_sequences(
            prompt_ids, prompt_mask, "prompt_ids", allow_empty=False, vocab_size=vocab, tokenizer=self.tokenizer
        )
        completions = as_sequences(
            completion_ids, completion_mask, "completion_ids", allow_empty=True, vocab_size=vocab,
            tokenizer=self.tokenizer,
        )
        batch = len(completions)
        if len(prompts) != batch:
            raise ValueError(f"got {len(prompts)} prompts and {batch} completions; pass one prompt per completion")
        use_comparison = self.sar_options["use_comparison"]
        placeholders = placeholder_rows(placeholder_ids, self.placeholder_ids, batch, vocab) if use_comparison else []

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
            nll_cond = cond_nll_from_logprobs(cond_logprobs, completions, completion_mask)
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
        prefixes: list[torch.Tensor] = []
        prefix_index: dict[tuple[int, ...], int] = {}
        pairs: list[Pair] = []
        halves = [h for h in (prompts, placeholders) if h is not None]
        for half in halves:
            for i, prefix in enumerate(half):
                if not bool(valid[i]):
                    continue
                key = tuple(prefix.tolist())
                if key not in prefix_index:
                    prefix_index[key] = len(prefixes)
                    prefixes.append(prefix)
                pairs.append(Pair(prefix_index[key], i))

        ppl = torch.full((len(pairs),), math.nan, dtype=torch.float32)
        if not pairs:
            return self._split_halves(ppl, prompts, placeholders, valid)
        verify_scorer(self)  # the probe, once per model and config
        plan = plan_passes(
            pairs,
            prefixes,
            completions,
            self.max_tokens_per_pass,
            regime=self.rope_regime,
            feed_last=self.feed_last,
        )
        with self.scoring_mode():
            for members in plan:
                pack = build_pass(
                    [pairs[j] for j in members],
                    prefixes,
                    completions,
                    self.attention_backend,
                    feed_last=self.feed_last,
                )
                ppl[members] = self._pass_perplexity(pack).float().cpu()
        return self._split_halves(ppl, prompts, placeholders, valid)

    @staticmethod
    def _split_halves(
        ppl: torch.Tensor,
        prompts: list[torch.Tensor] | None,
        placeholders: list[torch.Tensor] | None,
        valid: torch.Tensor,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The per-pair perplexities (conditioned pairs first, then unconditioned) as rows of the batch."""
        batch = len(valid)
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
