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
to floating-point reassociation, by one of two paths:

* the **packed path** above, for models on which it is proven (:mod:`sarkern.verification`: structural checks, then a
  probe at the packing the scorer will really use, with a tolerance calibrated on the model itself);
* the **universal path** (:mod:`sarkern.universal`) for every other causal LM: right-padded, length-bucketed batches
  through the model's own forward (its attention, masks, recurrent state), then the same fused op.

``scoring_path="auto"`` chooses per model, ``"packed"`` insists on the fast path (refusing, with the cause, a model
where it is not proven), ``"universal"`` always runs the model's own forward. :attr:`SARScorer.scoring_path` and
:attr:`SARScorer.scoring_path_reason` tell which path ran and why; so does :attr:`SARScores.scoring_path`. A model
neither path can score (its logits are not its LM head's output under a transform the scorer knows) raises
:class:`UnsupportedModelError` naming the cause. Input handling lives in :mod:`sarkern.score_inputs`, the packed
layout in :mod:`sarkern.packing`, the model's modules (resolved at every call) in :mod:`sarkern.scoring_model`, what
is read from the config in :mod:`sarkern.model_support`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from . import verification
from .attention import ATTENTION_BACKENDS, AttentionBackend, register_attention
from .model_support import UnsupportedModelError, check_config_traps
from .ops import check_temperature
from .packing import Pair, build_pass, plan_passes
from .placeholder import PlaceholderPrompts, is_conversation, validate_placeholder_preset, validate_token_ids
from .sar import sar_reward_from_nll, validate_sar_options
from .score_inputs import (
    TOKENS_AFTER_EOS_RULES,
    BatchIds,
    IdsLike,
    as_sequences,
    cond_nll_from_logprobs,
    cut_after_first_eos,
    eos_ids_of,
    placeholder_rows,
)
from .scoring_model import ScoringModel
from .sharding import check_whole_parameters, gathered_call
from .structure import packed_path_obstacle
from .universal import build_batch, plan_batches

__all__ = [
    "SARScorer",
    "SARScores",
    "SelfAlignedReward",
    "UnsupportedModelError",
]

DEFAULT_MAX_TOKENS_PER_PASS = 32768

ScoringPath = Literal["auto", "packed", "universal"]
SCORING_PATHS = ("auto", "packed", "universal")


@dataclass
class SARScores:
    """Per-completion results of :meth:`SARScorer.score`, one row per completion, on the model's device.

    Attributes:
        reward: fp32 SAR reward (the configured variant).
        ppl_cond: fp32 ``ppl(a | q)``, the completion's perplexity after its prompt.
        ppl_uncond: fp32 ``ppl(a)``, after the placeholder prompt (NaN when ``use_comparison=False``: not computed).
        num_tokens: fp32 number of completion tokens (EOS included) the perplexities average over.
        valid: bool, False for rows that could not be scored (empty completions); their other fields are NaN/0.
        scoring_path: ``"packed"`` or ``"universal"``: the path that computed them (``None`` when no forward ran,
            e.g. every completion empty, or the conditioned half given and no unconditioned half asked).
    """

    reward: torch.Tensor
    ppl_cond: torch.Tensor
    ppl_uncond: torch.Tensor
    num_tokens: torch.Tensor
    valid: torch.Tensor
    scoring_path: str | None = None

    def __len__(self) -> int:
        return self.reward.shape[0]


class SARScorer:
    """Scores completions with the Self-Aligned Reward using the model's current weights.

    Args:
        model: a Hugging Face causal LM (a PEFT model wrapping one too). Its modules (backbone, LM head, adapters)
            are looked up at every call, so wrapping or resizing it later is followed. It stays where and how it is
            (device, dtype, training mode and attention implementation are restored after each call).
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
        scoring_path: ``"auto"`` (default): the packed path where it is proven on the model, the universal path
            otherwise; ``"packed"``: the packed path or :class:`UnsupportedModelError` naming why it is not proven;
            ``"universal"``: the model's own forward in right-padded batches (no probe of the packed path).
        tokens_after_eos: what :meth:`score` does with a completion's tokens after its first EOS: ``"cut"``
            (default) scores each completion up to and including its first EOS, as the official SAR code (its
            response mask) and TRL (its completion mask) do; ``"raise"``: ``ValueError`` naming the completion.
        eos_token_ids: the ids that end a completion; default: TRL's, the model's ``generation_config.eos_token_id``
            and the tokenizer's ``eos_token_id``. ``()``: none (every completion scored whole).

    Attributes:
        scoring_path, scoring_path_reason: the path the last scoring took (``"packed"``/``"universal"``; ``None``
            until decided, which happens at construction when a structural check settles it, else at the first
            :meth:`score`) and why, in one line.

    Raises:
        UnsupportedModelError: for a model neither path can score exactly, naming the reason: at construction for
            known config traps (naming the field) and, with ``scoring_path="packed"``, structural obstacles; at the
            first :meth:`score` when its logits are not what the scorer computes from its LM head, or (``"packed"``)
            when the probe does not prove the packed path.
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
        scoring_path: ScoringPath = "auto",
        tokens_after_eos: Literal["cut", "raise"] = "cut",
        eos_token_ids: Sequence[int] | None = None,
    ) -> None:
        check_config_traps(model)
        if scoring_path not in SCORING_PATHS:
            raise ValueError(f"scoring_path must be one of {', '.join(SCORING_PATHS)}, got {scoring_path!r}")
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
        if tokens_after_eos not in TOKENS_AFTER_EOS_RULES:
            raise ValueError(f"tokens_after_eos must be 'cut' or 'raise', got {tokens_after_eos!r}")
        if eos_token_ids is None:
            eos_token_ids = eos_ids_of(model, tokenizer)
        elif isinstance(eos_token_ids, int):
            eos_token_ids = [eos_token_ids]
        eos_token_ids = validate_token_ids(eos_token_ids, name="eos_token_ids", allow_empty=True)
        self.tokens_after_eos = tokens_after_eos
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

        self.requested_path = scoring_path
        self._attention_name = register_attention()
        view = self.resolve()  # checks now that a backbone and an LM head are there
        self.scoring_path: str | None = None
        self.scoring_path_reason: str | None = None
        if scoring_path == "universal":
            self._set_path("universal", "scoring_path='universal' was asked for")
        else:
            obstacle = packed_path_obstacle(model, view.configs())
            if obstacle is not None and scoring_path == "packed":
                raise UnsupportedModelError(f"the packed path cannot score {view.name}: {obstacle}")
            if obstacle is not None:
                self._set_path("universal", f"{view.name}: {obstacle}")
        self.vocab_size = view.vocab_size
        # The ids score() cuts completions after (checked against the vocabulary, as every id it is given).
        self.eos_token_ids = validate_token_ids(
            eos_token_ids, name="eos_token_ids", vocab_size=self.vocab_size, allow_empty=True
        )

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

    def resolve(self) -> ScoringModel:
        """The model's modules as they are now, with this scorer's precision options (made at every call)."""
        return ScoringModel(
            self.model,
            attention_name=self._attention_name,
            attention_backend=self.attention_backend,
            forward_context=self.forward_context,
            autocast_dtype=self.autocast_dtype,
            lm_head_fp32=self.lm_head_fp32,
        )

    @property
    def backbone(self) -> nn.Module:
        return self.resolve().backbone

    @property
    def lm_head(self) -> nn.Module:
        return self.resolve().head

    @property
    def device(self) -> torch.device:
        return self.resolve().device

    @contextmanager
    def scoring_mode(self, shared_prefix: bool = False) -> Iterator[None]:
        """The context the scorer's forwards run in (see :meth:`ScoringModel.scoring_mode`)."""
        with self.resolve().scoring_mode(shared_prefix):
            yield

    def check_head(self) -> None:
        """Check now (one forward of two short sequences) that the model's logits are what the scorer computes
        from its LM head; raise :class:`UnsupportedModelError` naming the cause otherwise. :meth:`score` does it at
        its first call; a trainer calls it at construction so that a model no path can score is refused there."""
        view = self.resolve()
        verification.check_head(view, verification.verdict_for(view))

    def verify(self, rows: int | None = None) -> str:
        """Decide the scoring path now rather than at the first :meth:`score`: check the head and (unless
        ``scoring_path="universal"``) probe the packed path for passes of up to ``rows`` rows (default
        ``max_tokens_per_pass``, the longest pass the scorer builds). Returns the path; raises as :meth:`score`."""
        rows = self.max_tokens_per_pass if rows is None else rows
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ValueError(f"rows must be a positive int, got {rows!r}")
        view = self.resolve()
        verdict = verification.verdict_for(view)
        verification.check_head(view, verdict)
        if self.requested_path == "universal":
            return "universal"
        verification.prove_packed(view, verdict, min(rows, self.max_tokens_per_pass), self.max_tokens_per_pass,
                                  self.placeholder_ids)  # fmt: skip
        return self._record_verdict(view, verdict)

    def _record_verdict(self, view: ScoringModel, verdict: verification.Verdict) -> str:
        reason = verdict.packed_reason()
        if reason is None:
            self._set_path(
                "packed", f"{view.name}: the packed path is proven on the model for rows up to {verdict.proven_rows}"
            )
            return "packed"
        if self.requested_path == "packed":
            raise UnsupportedModelError(f"the packed path is not proven: {reason}")
        self._set_path("universal", reason)
        return "universal"

    def _set_path(self, path: str, reason: str) -> None:
        self.scoring_path, self.scoring_path_reason = path, reason

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
                Tokens after a completion's first EOS (:attr:`eos_token_ids`), masked-in ones included, are cut
                (``tokens_after_eos="cut"``, the default: never scored, as in the official code and TRL) or refused
                (``"raise"``); ``num_tokens`` counts what is scored.
            cond_logprobs: optional per-token ``log p(a_t | q, a_<t)`` at the scorer's temperature, from the current
                weights, to skip the conditioned half. Either a list of 1-D tensors (one log-prob per completion
                token), or a 2-D tensor ``[batch, L]``: with ``completion_mask`` of the same shape its masked entries
                are used (a GRPO trainer's per-token log-probs and completion mask); otherwise the first
                ``len(completion_i)`` entries of row ``i``. One log-prob per completion token as given: those of
                tokens cut after the first EOS are left out of the mean.
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
        view = self.resolve()  # the modules as they are now (a PEFT wrap or a resize since the last call)
        vocab = self.vocab_size = view.vocab_size
        prompts = as_sequences(
            prompt_ids, prompt_mask, "prompt_ids", allow_empty=False, vocab_size=vocab, tokenizer=self.tokenizer
        )
        completions = as_sequences(
            completion_ids, completion_mask, "completion_ids", allow_empty=True, vocab_size=vocab,
            tokenizer=self.tokenizer,
        )
        given = completions
        completions, kept = cut_after_first_eos(given, self.eos_token_ids, self.tokens_after_eos)
        batch = len(completions)
        if len(prompts) != batch:
            raise ValueError(f"got {len(prompts)} prompts and {batch} completions; pass one prompt per completion")
        use_comparison = self.sar_options["use_comparison"]
        placeholders = placeholder_rows(placeholder_ids, self.placeholder_ids, batch, vocab) if use_comparison else []

        lengths = torch.tensor([len(c) for c in completions], dtype=torch.long)
        valid = lengths > 0
        if self.empty_completions == "raise" and not bool(valid.all()):
            raise ValueError(f"completion_ids[{int((~valid).nonzero()[0])}] is empty; there is nothing to score")
        self._check_lengths(view, prompts, completions, "prompt")
        if use_comparison:
            self._check_lengths(view, placeholders, completions, "placeholder prompt")

        nan = torch.full((batch,), math.nan, dtype=torch.float32)
        cond_given = cond_logprobs is not None
        if cond_given:  # checked before any forward runs
            nll_cond = cond_nll_from_logprobs(cond_logprobs, given, completion_mask, kept)
        ppl_cond = ppl_uncond = nan
        path = None
        if not cond_given or use_comparison:  # a forward is needed for at least one half
            ppl_c, ppl_u, path = self._perplexities(
                view, None if cond_given else prompts, placeholders if use_comparison else None, completions, valid
            )
            ppl_cond = nan if ppl_c is None else ppl_c
            ppl_uncond = nan if ppl_u is None else ppl_u
        if cond_given:
            ppl_cond = torch.where(valid, torch.exp(nll_cond), nan)
        reward = sar_reward_from_nll(
            torch.log(ppl_cond), torch.log(ppl_uncond) if use_comparison else None, **self.sar_options
        ).float()
        device = view.device
        return SARScores(
            reward=reward.to(device),
            ppl_cond=ppl_cond.to(device),
            ppl_uncond=ppl_uncond.to(device),
            num_tokens=lengths.float().to(device),
            valid=valid.to(device),
            scoring_path=path,
        )

    @staticmethod
    def _check_lengths(
        view: ScoringModel, prefixes: list[torch.Tensor], completions: list[torch.Tensor], what: str
    ) -> None:
        limit = view.max_positions
        if limit is None:
            return
        for i, (prefix, completion) in enumerate(zip(prefixes, completions)):
            total = len(prefix) + len(completion)
            if total > limit:
                raise ValueError(
                    f"{what} {i} + completion {i} is {total} tokens, more than the model's "
                    f"max_position_embeddings ({limit})"
                )

    def _perplexities(
        self,
        view: ScoringModel,
        prompts: list[torch.Tensor] | None,
        placeholders: list[torch.Tensor] | None,
        completions: list[torch.Tensor],
        valid: torch.Tensor,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, str | None]:
        """Conditioned and/or unconditioned perplexities of every non-empty completion, and the path that ran."""
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

        # The head check runs the model's root forward (collectives under FSDP2 / ZeRO-3): every process runs it
        # at its first call, whatever its batch, empty included.
        verdict = verification.verdict_for(view)
        verification.check_head(view, verdict)
        ppl = torch.full((len(pairs),), math.nan, dtype=torch.float32)
        if not pairs:
            c, u = self._split_halves(ppl, prompts, placeholders, valid)
            return c, u, None
        plan = None
        if self.requested_path != "universal":
            plan = self._packed_plan(view, verdict, pairs, prefixes, completions)
        if plan is not None:
            with view.scoring_mode(shared_prefix=True):
                for members in plan:
                    pack = build_pass(
                        [pairs[j] for j in members], prefixes, completions, view.attention_backend,
                        feed_last=view.feed_last,
                    )  # fmt: skip
                    hidden = view.packed_hidden(pack)
                    ppl[members] = (
                        view.perplexities(hidden, pack.targets, pack.segment_ids, pack.num_pairs, self.temperature)
                        .float()
                        .cpu()
                    )
            path = "packed"
        else:
            batches = plan_batches(
                pairs, prefixes, completions, self.max_tokens_per_pass, regime=view.rope_regime,
                feed_last=view.feed_last,
            )  # fmt: skip
            with view.scoring_mode(shared_prefix=False):
                for members in batches:
                    batch = build_batch([pairs[j] for j in members], prefixes, completions, feed_last=view.feed_last)
                    hidden = view.padded_hidden(batch.input_ids, batch.attention_mask, batch.predict_rows)
                    ppl[members] = (
                        view.perplexities(hidden, batch.targets, batch.segment_ids, batch.num_pairs, self.temperature)
                        .float()
                        .cpu()
                    )
            path = "universal"
        c, u = self._split_halves(ppl, prompts, placeholders, valid)
        return c, u, path

    def _packed_plan(self, view, verdict, pairs, prefixes, completions) -> list[list[int]] | None:
        """The packed passes when the packed path is proven for rows as long as theirs (probing it now if needed);
        None for the universal path. Records the choice and its reason."""
        plan = plan_passes(
            pairs, prefixes, completions, self.max_tokens_per_pass, regime=view.rope_regime, feed_last=view.feed_last
        )
        longest = max(self._pass_rows(members, pairs, prefixes, completions, view.feed_last) for members in plan)
        verification.prove_packed(view, verdict, longest, self.max_tokens_per_pass, self.placeholder_ids)
        return plan if self._record_verdict(view, verdict) == "packed" else None

    @staticmethod
    def _pass_rows(members, pairs, prefixes, completions, feed_last: bool) -> int:
        used = {pairs[j].prefix for j in members}
        own = sum(len(completions[pairs[j].completion]) - (0 if feed_last else 1) for j in members)
        return own + sum(len(prefixes[p]) for p in used)

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
    keeps each prompt's system (and developer) messages (`placeholder="paper"`: the official code's placeholder,
    :mod:`sarkern.placeholder`; build the prompts with :func:`sarkern.placeholder.paper_prompt` so that the real
    prompts carry the same system prompt). Give it the model instance the trainer trains, so that SAR uses the current
    policy weights. Empty completions get ``None`` (TRL's "not applicable"). Tokens after a completion's first EOS
    are cut before scoring (TRL's completion ids already end there; ``tokens_after_eos="raise"`` refuses them).

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
