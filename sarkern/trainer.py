"""GRPO with the Self-Aligned Reward: TRL's `GRPOTrainer` with SAR as one more weighted, logged reward.

SAR is measured on what the policy sees: the prompt ids TRL generated from, the completions as sampled, a placeholder
built per completion from the prompt's own system messages with the trainer's `chat_template_kwargs`, and the policy's
own precision (the scorer runs under `accelerator.autocast`, as the policy's forward does).

SAR costs at most one extra no-grad pass per generation batch, and usually half of one: the conditioned per-token
log-probs are reused when the trainer has them, in this order: TRL's old log-probs (computed when generation and
optimisation steps are misaligned); the log-probs captured while transformers' `generate` sampled the completions
(`sarkern.capture`, TRL's default path); exact sampling log-probs from vLLM (temperature 1, no top-k, top-p, min-p or
repetition penalty). A source is reused only where it can be ppl(a|q): never under active dropout (TRL generates and
computes old log-probs in training mode), never for generation modes other than sampling and greedy search (beam
search reorders rows), never when the captured steps do not line up with the completions (a `generate` that runs no
logits processors); each such case is reported in one log line and SAR runs its own conditioned pass. The first batch
that reuses a source also runs the conditioned pass and checks that both agree within the bound measured for the
policy's precision, so a change in TRL's or transformers' internals stops training with an error naming what is left
as the cause, instead of scoring the wrong tensors.

TRL's private methods this trainer extends (`_generate`, `_generate_single_turn`, `_generate_and_score_completions`,
`_get_per_token_logps_and_entropies`) change between TRL minor versions: `TESTED_TRL` is the range tested, and
`check_trl_internals` (run at construction) raises if their signatures differ from what this module expects.
"""

from __future__ import annotations

import copy
import inspect
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import transformers
import trl
from accelerate.logging import get_logger
from datasets import Dataset
from packaging.version import Version
from torch import nn
from transformers.generation import GenerationMode
from trl import GRPOConfig, GRPOTrainer

from .capture import CAPTURE_NLL_BOUNDS, CaptureMismatchError, capture_sampling_logprobs
from .placeholder import PLACEHOLDER_PRESETS, validate_placeholder_preset
from .rundir import AtomicCheckpoints
from .sar import validate_sar_options
from .scorer import DEFAULT_MAX_TOKENS_PER_PASS, SARScorer
from .sharding import gathered_call, refuse_fsdp1, run_requested_engine

__all__ = [
    "TESTED_TRL", "SARGRPOConfig", "SARGRPOTrainer", "TRLInternalsError", "active_dropout", "check_trl_internals",
]  # fmt: skip

logger = get_logger(__name__)
# TRL's own logger, for the warnings TRL would give that SAR's reward column hides.
trl_logger = get_logger(GRPOTrainer.__module__)

# Generation modes in which each returned token was chosen, at its step, from that step's logits: only there do the
# log-probs seen by a logits processor belong to the returned completions (beam search reorders and prunes rows).
_CAPTURABLE_MODES = (GenerationMode.SAMPLE, GenerationMode.GREEDY_SEARCH)

# The TRL versions this trainer was tested with: [first, last) (tests/test_trainer.py, tests/test_trl_internals.py).
TESTED_TRL = ("1.16.0", "1.17.0")

# GRPOTrainer's private methods this trainer overrides or calls, with the leading parameters it relies on.
_TRL_METHODS = {
    "__init__": ("model", "reward_funcs", "args", "train_dataset"),
    "_generate": ("prompts",),
    "_generate_single_turn": ("prompt_ids", "images", "multimodal_fields", "num_generations"),
    "_generate_and_score_completions": ("inputs",),
    "_get_per_token_logps_and_entropies": ("model", "input_ids", "attention_mask", "logits_to_keep"),
    "_calculate_rewards": ("inputs", "prompts", "completions", "completion_ids_list"),
}
# Length of the tuple `_generate` returns: prompt_ids, completion_ids, tool_mask, completions, logprobs, extra_fields,
# images, tool_images.
_GENERATE_OUTPUTS = 8


def _model_name(model) -> str:
    """The name TRL gives a default config's output directory: the model's id without its owner or folders."""
    name = model if isinstance(model, str) else getattr(model.config, "_name_or_path", "")
    return name.split("/")[-1]


def active_dropout(model: nn.Module) -> str | None:
    """The first dropout that a training-mode forward of ``model`` applies (an ``nn.Dropout`` with p > 0, or a float
    attribute such as ``attention_dropout`` that attention functions read in training mode), or None."""
    for name, module in model.named_modules():
        if not module.training:
            continue
        if isinstance(module, nn.modules.dropout._DropoutNd) and module.p > 0:
            return f"{name or type(module).__name__} (p={module.p:g})"
        for attr, value in vars(module).items():
            if "dropout" in attr and isinstance(value, float) and value > 0:
                return f"{name}.{attr}={value:g}"
    return None


class TRLInternalsError(RuntimeError):
    """TRL's GRPOTrainer internals differ from those SARGRPOTrainer was written against."""


def check_trl_internals(trainer_class: type = GRPOTrainer) -> None:
    """Raise :class:`TRLInternalsError` if a private method of TRL's GRPOTrainer that SAR relies on is missing or has
    other parameters; warn when TRL's version is outside :data:`TESTED_TRL`."""
    for name, expected in _TRL_METHODS.items():
        method = getattr(trainer_class, name, None)
        if not callable(method):
            raise TRLInternalsError(
                f"TRL {trl.__version__}: GRPOTrainer.{name} is gone; SARGRPOTrainer was tested with TRL "
                f">={TESTED_TRL[0]},<{TESTED_TRL[1]}"
            )
        params = [p for p in inspect.signature(method).parameters if p != "self"]
        if tuple(params[: len(expected)]) != expected:
            raise TRLInternalsError(
                f"TRL {trl.__version__}: GRPOTrainer.{name}{tuple(params)} no longer starts with {expected}; "
                f"SARGRPOTrainer was tested with TRL >={TESTED_TRL[0]},<{TESTED_TRL[1]}"
            )
    if not Version(TESTED_TRL[0]) <= Version(trl.__version__) < Version(TESTED_TRL[1]):
        warnings.warn(
            f"SARGRPOTrainer was tested with TRL >={TESTED_TRL[0]},<{TESTED_TRL[1]}, not {trl.__version__}; its "
            "run-time checks stop training if TRL's internals changed",
            UserWarning,
            stacklevel=3,
        )


@dataclass
class SARGRPOConfig(GRPOConfig):
    """`GRPOConfig` plus the Self-Aligned Reward. `reward_weights`, when given, weigh the user's reward functions
    only; SAR's weight is `sar_weight`."""

    sar_weight: float = field(default=0.2, metadata={"help": "Weight of SAR in the training reward (paper: 0.2)."})
    sar_use_log: bool = field(default=False, metadata={"help": "Use log-perplexity (mean NLL) instead of perplexity."})
    sar_use_denominator: bool = field(default=True, metadata={"help": "Normalise by ppl(a): (A - QA) / A."})
    sar_use_comparison: bool = field(
        default=True,
        metadata={"help": "False gives the self-confidence baseline -ppl(a|q) (no unconditioned pass)."},
    )
    sar_clip_value: float = field(default=-1.0, metadata={"help": "Cap each perplexity at this value when > 1."})
    sar_placeholder: str = field(
        default="template",
        metadata={
            "help": "Placeholder prompt preset: 'template' (the chat template with the user's content emptied, each "
            "prompt's system messages kept) or 'paper' (the official code's fixed system prompt).",
            "choices": list(PLACEHOLDER_PRESETS),
        },
    )
    sar_placeholder_ids: list[int] | None = field(
        default=None, metadata={"help": "Explicit token ids of the placeholder prompt (instead of a preset)."}
    )
    sar_max_tokens_per_pass: int = field(
        default=DEFAULT_MAX_TOKENS_PER_PASS, metadata={"help": "Tokens per packed scoring forward."}
    )
    sar_reuse_logprobs: bool = field(
        default=True,
        metadata={
            "help": "Reuse the conditioned log-probs the trainer has (old log-probs, log-probs captured during "
            "generation, exact vLLM sampling log-probs) so that only the placeholder half runs."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        validate_sar_options(
            use_log=self.sar_use_log,
            use_denominator=self.sar_use_denominator,
            use_comparison=self.sar_use_comparison,
            clip_value=self.sar_clip_value,
        )
        if not math.isfinite(self.sar_weight):
            raise ValueError(f"sar_weight must be finite, got {self.sar_weight}")
        validate_placeholder_preset(self.sar_placeholder)
        if self.sar_placeholder_ids is not None and self.sar_placeholder != "template":
            raise ValueError(f"pass either sar_placeholder_ids or sar_placeholder={self.sar_placeholder!r}, not both")


class _SARRewardFunction:
    """The reward-function face of the trainer's SAR scorer, so TRL weighs, logs (`rewards/sar/...`) and
    normalises SAR like any other reward."""

    __name__ = "sar"

    def __init__(self, trainer: SARGRPOTrainer):
        self._trainer = trainer

    def __call__(self, prompts, completions, completion_ids, **kwargs) -> list[float | None]:
        return self._trainer._sar_rewards(completion_ids)


class SARGRPOTrainer(AtomicCheckpoints, GRPOTrainer):
    """`GRPOTrainer` whose reward includes `sar_weight * SAR`, computed with the policy's current weights.

    Logged each step, besides TRL's own metrics (`rewards/sar/mean` among them), reduced over all processes:
    `sar/ppl_cond` and `sar/ppl_uncond` (means over the global batch), `sar/cond_reused` (1 when the conditioned
    log-probs came from the trainer), `sar/packed_path` (1 on the scorer's packed path, 0 on its universal path; the
    path and its reason are also logged once), `sar/seconds` (the slowest process's SAR time) and `sar/step_share`
    (that over the slowest process's step time). SAR is not computed at evaluation.

    A drop-in for `GRPOTrainer`: the same arguments (`args=None` builds a default `SARGRPOConfig` named after the
    model, as TRL does), `reward_processing_classes` for the caller's reward functions (SAR's slot is added), TRL's
    refusal of a trainer without `reward_funcs` (SAR alone is not trained on) and TRL's warning when every reward
    function returns None for a completion (SAR still rewards it).

    Runs under every engine accelerate offers, DDP, FSDP2 and DeepSpeed ZeRO-3: SAR is scored inside the engine's
    parameter gathering (`sarkern.sharding.gathered_call`). On CPU processes, where accelerate would silently train as
    DDP instead, FSDP2 is switched on as asked; what cannot be is refused (`sarkern.sharding.run_requested_engine`).

    Refused by name, because the scorer would not see what the policy sees: tools and environments (completions hold
    tool results the policy did not sample), `rollout_func`, vision-language processors; and FSDP1, whose flat
    parameters hold no whole LM head.
    """

    def __init__(self, model, reward_funcs=None, args: SARGRPOConfig | None = None, *more_args, **kwargs):
        check_trl_internals()
        # GRPOTrainer's own signature: the same positional and keyword arguments, the same TypeError on others.
        bound = inspect.signature(GRPOTrainer.__init__).bind(self, model, reward_funcs, args, *more_args, **kwargs)
        params = dict(bound.arguments)
        del params["self"]
        if args is None:  # as TRL does: a default config named after the model
            args = SARGRPOConfig(f"{_model_name(model)}-GRPO")
        if not isinstance(args, SARGRPOConfig):
            raise TypeError(
                f"args must be an SARGRPOConfig, got {type(args).__name__}: SARGRPOConfig takes every GRPOConfig "
                "field and adds the sar_* ones"
            )
        if reward_funcs is None:
            reward_funcs = []
        elif not isinstance(reward_funcs, list):
            reward_funcs = [reward_funcs]
        user_weights = args.reward_weights if args.reward_weights is not None else [1.0] * len(reward_funcs)
        if len(user_weights) != len(reward_funcs):
            raise ValueError(
                f"Number of reward weights ({len(user_weights)}) must match number of reward functions "
                f"({len(reward_funcs)})"
            )
        processing_classes = params.get("reward_processing_classes")
        if processing_classes is not None:
            if not isinstance(processing_classes, list):
                processing_classes = [processing_classes]
            if len(processing_classes) != len(reward_funcs):  # TRL's check, on the caller's reward functions
                raise ValueError(
                    f"The number of reward processing classes ({len(processing_classes)}) must match the number of "
                    f"reward functions ({len(reward_funcs)})."
                )
        args = copy.copy(args)  # the caller's config keeps its own reward_weights
        # sar_weight = 0 is plain GRPO: no SAR reward function, no scorer, no extra pass.
        self.sar_enabled = args.sar_weight != 0.0
        if self.sar_enabled:
            for name in ("tools", "environment_factory", "rollout_func"):
                if params.get(name):
                    raise NotImplementedError(
                        f"SARGRPOTrainer does not support {name}: the completions would hold tokens the policy did "
                        "not sample (tool results, environment feedback), which SAR would score as its own"
                    )
            if not reward_funcs:  # TRL refuses to train without a reward; SAR alone is a regulariser, not a task
                raise ValueError(
                    "No reward source provided. Pass `reward_funcs` (e.g. a correctness reward): SARGRPOTrainer adds "
                    "SAR to them and does not train on SAR alone"
                )
            reward_funcs = [*reward_funcs, _SARRewardFunction(self)]
            user_weights = [*user_weights, args.sar_weight]
            if processing_classes is not None:
                processing_classes = [*processing_classes, None]  # SAR tokenizes nothing
        args.reward_weights = list(user_weights)
        params.update(model=model, reward_funcs=reward_funcs, args=args)
        if processing_classes is not None:
            params["reward_processing_classes"] = processing_classes
        self._sar_notes: set[str] = set()  # reasons already reported why a reuse source was not used
        self._sar_path_logged = None  # the scoring path last reported in the log
        super().__init__(**params)
        self._sar_batch: dict[str, Any] = {}
        self._sar_capture_old_logps = False
        self._sar_seconds_in_step = 0.0
        self._sar_step_seconds = 0.0
        self._sar_verified: set[str] = set()  # reuse sources checked against a fresh conditioned pass
        self.sar_calls = {"scored": 0, "cond_reused": 0}
        self.sar_scorer = None
        if not self.sar_enabled:
            return
        self._refuse_unsupported_setups()
        self.sar_scorer = SARScorer(
            self.accelerator.unwrap_model(self.model),
            self._tokenizer,
            placeholder_ids=args.sar_placeholder_ids,
            placeholder=args.sar_placeholder,
            chat_template_kwargs=self.chat_template_kwargs,
            temperature=args.temperature,
            max_tokens_per_pass=args.sar_max_tokens_per_pass,
            use_log=args.sar_use_log,
            use_denominator=args.sar_use_denominator,
            use_comparison=args.sar_use_comparison,
            clip_value=args.sar_clip_value,
            # The policy's forward runs under the accelerator's autocast (mixed precision): so do both SAR halves.
            forward_context=self.accelerator.autocast,
            lm_head_fp32=bool(args.cast_lm_head_to_fp32),
        )
        # What can be known before step 1 is raised here: config traps and structural refusals came with the
        # scorer; the head check needs one short forward, run now on every process alike, inside the parameter
        # gathering of an engine that already shards the policy (ZeRO-3 partitions it at load under zero.Init;
        # accelerate applies FSDP2 later, at prepare). Not checked against the accelerator's engine: the policy
        # is prepared only when training starts.
        gathered_call(self.sar_scorer.model, self.sar_scorer.check_head)
        self._check_placeholder_renders()

    def _check_placeholder_renders(self) -> None:
        """Build the placeholder of the first training prompt now: a chat template that raises on an empty user
        turn, or plain-text prompts for a tokenizer with nothing to start a text with, are refused at construction
        (by name, with the way out) rather than at the first step."""
        dataset = self.train_dataset
        if not isinstance(dataset, Dataset) or len(dataset) == 0:  # an IterableDataset is not read ahead of time
            return
        if "prompt" in dataset.column_names:
            self.sar_scorer.placeholder_prompts.for_prompt(dataset[0]["prompt"])

    def create_accelerator_and_postprocess(self) -> None:
        # transformers 5 gathers the FSDP settings in `args.fsdp_plugin_args`; 4.x passes them to accelerate through
        # the environment (ACCELERATE_USE_FSDP, FSDP_*), which both checks read when given None.
        fsdp_plugin_args = getattr(self.args, "fsdp_plugin_args", None)
        if self.sar_enabled:
            refuse_fsdp1(fsdp_plugin_args)
        super().create_accelerator_and_postprocess()
        # accelerate turns FSDP and DeepSpeed off on CPU processes without a word: run FSDP2 as asked, refuse others.
        if run_requested_engine(self.accelerator, fsdp_plugin_args):
            self.is_fsdp_enabled = True

    def _refuse_unsupported_setups(self) -> None:
        if self._is_vlm:
            raise NotImplementedError(
                "SARGRPOTrainer does not support vision-language models: the scorer sees token ids only, not images"
            )
        plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        if self.is_fsdp_enabled and getattr(plugin, "fsdp_version", 1) != 2:
            refuse_fsdp1({"fsdp_version": plugin.fsdp_version})  # asked for some other way than the two checked first

    # --------------------------------------------------------------- capturing what the trainer already computed

    def _sampling_logprobs_exact(self) -> bool:
        """vLLM's sampling log-probs equal log p(a_t | q, a_<t) only for plain sampling at temperature 1."""
        args = self.args
        return (
            args.temperature == 1.0
            and (args.top_k in (None, 0, -1))
            and (args.top_p is None or args.top_p == 1.0)
            and args.min_p is None
            and (args.repetition_penalty is None or args.repetition_penalty == 1.0)
            and not args.generation_kwargs
        )

    def _trainer_computes_old_logps(self) -> bool:
        # The condition under which TRL computes old per-token log-probs in `_generate_and_score_completions`.
        generate_every = self.args.steps_per_generation * self.num_iterations
        return self.args.gradient_accumulation_steps % generate_every != 0 or bool(
            self.use_vllm and getattr(self, "vllm_importance_sampling_correction", False)
        )

    def _policy_precision(self) -> torch.dtype:
        """The dtype the policy computes its logits in: the autocast dtype under mixed precision, else the weights'
        (fp32 with TF32 matmuls counts as bf16-like: 10 mantissa bits, not 23)."""
        mixed = self.accelerator.mixed_precision
        if mixed == "bf16" and self.accelerator.native_amp:
            return torch.bfloat16
        if mixed == "fp16":
            return torch.float16
        dtype = self.sar_scorer.lm_head.weight.dtype
        if dtype == torch.float32 and self.sar_scorer.device.type == "cuda" and torch.backends.cuda.matmul.allow_tf32:
            return torch.bfloat16
        return dtype

    def _capture_during_generation(self) -> bool:
        """Capture the sampling log-probs in transformers' `generate` when they could be reused: training, reuse on,
        no old log-probs coming anyway, TRL's plain `generate` path (`_reuse_blocker` then says if they can be)."""
        return (
            self.sar_enabled
            and self.args.sar_reuse_logprobs
            and self.model.training
            and not self.use_vllm
            and not self.use_transformers_continuous_batching
            and not self._trainer_computes_old_logps()
        )

    def _reuse_blocker(self, source: str) -> str | None:
        """Why the `source` log-probs ("captured" or "old") cannot be proven to be this batch's ppl(a|q), or None."""
        dropout = active_dropout(self.model)
        if dropout is not None:
            return (
                f"the policy applies dropout in training mode ({dropout}), so the {source} log-probs come from a "
                "random sub-network, not from the policy SAR scores (set disable_dropout=True or the model's dropout "
                "to 0 to reuse them)"
            )
        if source == "captured":
            mode = self.generation_config.get_generation_mode()
            if mode not in _CAPTURABLE_MODES:
                return (
                    f"generation runs as {mode.value} (generation_kwargs), whose returned sequences are not the "
                    "tokens chosen at each decoding step, so no log-probs are captured"
                )
            precision = self._policy_precision()
            if precision not in CAPTURE_NLL_BOUNDS:
                return f"no capture bound was measured for a policy computing in {precision}"
        return None

    def _note(self, key: str, message: str) -> None:
        """One line per kind of reason, the first time a reuse source is given up for the conditioned pass."""
        if key not in self._sar_notes:
            self._sar_notes.add(key)
            logger.warning(f"SAR: {message}; SAR runs its own conditioned pass instead", main_process_only=False)

    def _generate_single_turn(self, prompt_ids, *args, **kwargs):
        if not self._capture_during_generation():
            return super()._generate_single_turn(prompt_ids, *args, **kwargs)
        self._sar_batch["through_single_turn"] = True
        blocker = self._reuse_blocker("captured")
        if blocker is not None:
            self._note("captured", blocker)
            return super()._generate_single_turn(prompt_ids, *args, **kwargs)
        with capture_sampling_logprobs(self.accelerator.unwrap_model(self.model_wrapped), self.temperature) as capture:
            completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kwargs)
        try:
            self._sar_batch["captured_logps"] = capture.per_completion(completion_ids)  # checked token by token
        except CaptureMismatchError as error:  # e.g. a `generate` that runs no logits processors
            self._note("captured-alignment", f"the log-probs captured during generation are not usable ({error})")
        self._sar_batch["capture_seconds"] = capture.seconds  # counted as SAR's time
        return completion_ids, logprobs

    def _generate(self, prompts):
        self._sar_batch = {}
        output = super()._generate(prompts)
        if not self.sar_enabled:
            return output
        if not isinstance(output, tuple) or len(output) != _GENERATE_OUTPUTS:
            raise TRLInternalsError(
                f"TRL {trl.__version__}: GRPOTrainer._generate returned "
                f"{len(output) if isinstance(output, tuple) else type(output).__name__} values, expected "
                f"{_GENERATE_OUTPUTS}; SARGRPOTrainer was tested with TRL >={TESTED_TRL[0]},<{TESTED_TRL[1]}"
            )
        prompt_ids, completion_ids, _tool_mask, _completions, sampling_logps = output[:5]
        if len(prompt_ids) != len(prompts) or len(completion_ids) != len(prompts):
            raise TRLInternalsError(
                f"TRL {trl.__version__}: GRPOTrainer._generate returned {len(prompt_ids)} prompts and "
                f"{len(completion_ids)} completions for {len(prompts)} prompts"
            )
        self._sar_batch.update(prompt_ids=prompt_ids, completion_ids=completion_ids, old_logps=None)
        if self.args.sar_use_comparison:
            # The placeholder of each completion: its prompt's system messages, the trainer's chat_template_kwargs.
            self._sar_batch["placeholder_ids"] = self.sar_scorer.placeholder_prompts.for_prompts(prompts)
        # vLLM may leave some sampling log-probs out (None): reuse only complete ones.
        if sampling_logps is not None and self.use_vllm and self._sampling_logprobs_exact():
            rows = [torch.tensor([math.nan if x is None else x for x in row]) for row in sampling_logps]
            if not any(bool(torch.isnan(row).any()) for row in rows):
                self._sar_batch["vllm_logps"] = rows
        return output

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        output = super()._get_per_token_logps_and_entropies(model, *args, **kwargs)
        # The first no-grad call of a generation batch computes the old log-probs with the policy's weights.
        if self._sar_capture_old_logps and not torch.is_grad_enabled():
            self._sar_batch["old_logps"] = output[0]
            self._sar_capture_old_logps = False
        return output

    def _generate_and_score_completions(self, inputs):
        self._sar_capture_old_logps = self.sar_enabled and self._trainer_computes_old_logps()
        try:
            return super()._generate_and_score_completions(inputs)
        finally:
            self._sar_capture_old_logps = False
            self._sar_batch = {}

    # ------------------------------------------------------------------------------------------------ the reward

    def _reusable_cond_logprobs(self, completion_ids: list[list[int]]) -> tuple[str | None, Any]:
        """(source, log-probs) of the conditioned half the trainer already has, or (None, None)."""
        batch = self._sar_batch
        if not self.args.sar_reuse_logprobs:
            return None, None
        if self._trainer_computes_old_logps():
            if batch.get("old_logps") is None:
                raise TRLInternalsError(
                    f"TRL {trl.__version__} computed no old log-probs through _get_per_token_logps_and_entropies "
                    "where SARGRPOTrainer expected them"
                )
            # With mask_truncated_completions, TRL scores truncated completions as fully masked (log-prob 0).
            eos_and_pad = {*self.eos_token_ids, self._tokenizer.pad_token_id}
            truncated = any(not ids or ids[-1] not in eos_and_pad for ids in completion_ids)
            if not (self.mask_truncated_completions and truncated):
                blocker = self._reuse_blocker("old")
                if blocker is None:
                    return "old", batch["old_logps"]
                self._note("old", blocker)
        if batch.get("captured_logps") is not None:
            return "captured", batch["captured_logps"]
        if self._capture_during_generation() and not batch.get("through_single_turn"):
            raise TRLInternalsError(
                f"TRL {trl.__version__} generated without GRPOTrainer._generate_single_turn, so no sampling log-probs "
                "were captured; SARGRPOTrainer was tested with TRL "
                f">={TESTED_TRL[0]},<{TESTED_TRL[1]}"
            )
        if batch.get("vllm_logps") is not None:
            return "vllm", batch["vllm_logps"]
        return None, None

    def _verify_reuse(self, source: str, reused: torch.Tensor, fresh: torch.Tensor, valid: torch.Tensor) -> None:
        """The first batch of each reuse source: its ppl(a|q) must agree with the scorer's own conditioned pass within
        the bound of the policy's precision. What could make them differ legitimately (dropout, beam search, an
        unmeasured precision) was ruled out before reuse, so what is left is named as the cause."""
        precision = self._policy_precision()
        bound = CAPTURE_NLL_BOUNDS.get(precision, CAPTURE_NLL_BOUNDS[torch.bfloat16])
        if bool(valid.any()):
            gap = (torch.log(reused[valid]) - torch.log(fresh[valid])).abs().max().item()
            if not gap <= bound:
                versions = f"TRL {trl.__version__}, transformers {transformers.__version__}"
                cause = {
                    "captured": f"with plain sampling and no dropout, {versions} computed or processed the logits "
                    "differently before the capture saw them (another temperature, a processor run first, a changed "
                    "cache or mask)",
                    "old": f"{versions} computed the old log-probs otherwise than a forward of the policy (another "
                    "temperature, masking or model state)",
                    "vllm": "vLLM returned processed log-probs, or sampled with weights other than the policy's",
                }[source]
                error = CaptureMismatchError if source == "captured" else TRLInternalsError
                raise error(
                    f"the {source} log-probs differ from a fresh conditioned pass by {gap:.3g} in mean NLL per "
                    f"completion (bound {bound:g} at {precision}): {cause}. Set sar_reuse_logprobs=False to score "
                    "both halves."
                )
        self._sar_verified.add(source)

    def _sar_rewards(self, completion_ids: list[list[int]]) -> list[float | None]:
        mode = "train" if self.model.training else "eval"
        if mode == "eval":
            return [None] * len(completion_ids)  # SAR shapes training only
        batch = self._sar_batch
        if batch.get("completion_ids") is None or len(batch["completion_ids"]) != len(completion_ids):
            raise RuntimeError("SAR reward called outside SARGRPOTrainer's generation step")
        if [list(c) for c in batch["completion_ids"]] != [list(c) for c in completion_ids]:
            raise TRLInternalsError(f"TRL {trl.__version__} scores other completions than it generated")
        source, cond_logprobs = self._reusable_cond_logprobs(completion_ids)
        placeholder_ids = batch.get("placeholder_ids")
        verify = source is not None and source not in self._sar_verified
        scorer, prompt_ids = self.sar_scorer, batch["prompt_ids"]

        def score() -> tuple[Any, Any]:
            fresh = None
            if verify:  # the first batch from a reuse source also runs the conditioned pass, to check it against
                fresh = scorer.score(prompt_ids, completion_ids, placeholder_ids=placeholder_ids)
            kwargs = {"cond_logprobs": cond_logprobs, "placeholder_ids": placeholder_ids}
            return fresh, scorer.score(prompt_ids, completion_ids, **kwargs)

        start = time.perf_counter()
        # One call inside the parameter gathering of the engine that shards the policy (FSDP2, ZeRO-3) on every
        # process, whatever it scores: the reuse source (hence a verifying pass) may differ from process to process.
        fresh, scores = gathered_call(scorer.model, score, accelerator=self.accelerator)
        seconds = time.perf_counter() - start + batch.get("capture_seconds", 0.0)
        if verify:
            self._verify_reuse(source, scores.ppl_cond.cpu(), fresh.ppl_cond.cpu(), scores.valid.cpu())
        self._sar_seconds_in_step += seconds
        self.sar_calls["scored"] += 1
        self.sar_calls["cond_reused"] += int(source is not None)
        self._log_scoring_path()
        self._log_sar_metrics(mode, scores, seconds, source is not None)
        return [None if math.isnan(r) else r for r in scores.reward.tolist()]

    def _scoring_path(self) -> tuple[str | None, str]:
        """(path, reason) the scorer reports: "packed", "universal", or None while undecided."""
        scorer = self.sar_scorer
        if not hasattr(scorer, "scoring_path"):  # a scorer from before the universal path: packed forwards only
            return "packed", "this SARScorer has the packed path only"
        return scorer.scoring_path, str(getattr(scorer, "scoring_path_reason", "") or "no reason given")

    def _log_scoring_path(self) -> None:
        """One log line when the scorer's path is first known (and again should it change)."""
        path, reason = self._scoring_path()
        if path is not None and path != self._sar_path_logged:
            self._sar_path_logged = path
            logger.info(f"SAR scoring path: {path} ({reason})")

    def _log_sar_metrics(self, mode: str, scores, seconds: float, reused: bool) -> None:
        """Means over the global batch (every process's valid completions), the slowest process's seconds."""
        valid = scores.valid
        path = self._scoring_path()[0]
        local = torch.tensor(
            [
                scores.ppl_cond[valid].double().sum().item(),
                scores.ppl_uncond[valid].double().sum().item() if self.args.sar_use_comparison else 0.0,
                float(valid.sum().item()),
                float(reused),
                seconds,
                {"packed": 1.0, "universal": 0.0}.get(path, math.nan),
            ],
            dtype=torch.float64,
            device=self.accelerator.device,
        )
        gathered = self.accelerator.gather(local[None]).cpu()  # [processes, 6]
        count = gathered[:, 2].sum().item()
        metrics = self._metrics[mode]
        metrics["sar/ppl_cond"].append(gathered[:, 0].sum().item() / count if count else math.nan)
        if self.args.sar_use_comparison:
            metrics["sar/ppl_uncond"].append(gathered[:, 1].sum().item() / count if count else math.nan)
        metrics["sar/cond_reused"].append(gathered[:, 3].mean().item())
        metrics["sar/seconds"].append(gathered[:, 4].max().item())
        metrics["sar/packed_path"].append(gathered[:, 5].mean().item())  # the share of processes on the packed path

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if self.sar_enabled and self.model.training:
            self._warn_if_only_sar_rewards(rewards_per_func, inputs, prompts, completions)
        return rewards_per_func

    def _warn_if_only_sar_rewards(self, rewards_per_func, inputs, prompts, completions) -> None:
        """TRL warns when every reward function returned None for a completion; SAR's column hides that from TRL's
        check, so the same warning is given here, on TRL's logger, for this process's completions."""
        start = self.accelerator.process_index * len(prompts)
        local = rewards_per_func[start : start + len(prompts)]
        only_sar = torch.isnan(local[:, :-1]).all(dim=1) & ~torch.isnan(local[:, -1])  # TRL warned of the others
        if bool(only_sar.any()):
            row = int(only_sar.nonzero()[0, 0])
            kwargs = {k: v for k, v in inputs[row].items() if k not in ("prompt", "completion", "completion_ids")}
            kwargs.update(prompt=prompts[row], completion=completions[row])
            trl_logger.warning(
                f"All reward functions returned None for the following kwargs:\n{kwargs}\n"
                "Please ensure that at least one reward function returns a valid reward. "
                "(SARGRPOTrainer: this completion is rewarded by SAR alone.)"
            )

    def training_step(self, model, inputs, num_items_in_batch):
        start = time.perf_counter()
        output = super().training_step(model, inputs, num_items_in_batch)
        self._sar_step_seconds += time.perf_counter() - start
        if self.sar_enabled and self._step % self.current_gradient_accumulation_steps == 0:
            local = torch.tensor(
                [self._sar_seconds_in_step, self._sar_step_seconds], dtype=torch.float64, device=self.accelerator.device
            )
            slowest = self.accelerator.gather(local[None]).max(dim=0).values.cpu()
            share = slowest[0].item() / slowest[1].item() if slowest[1] > 0 else 0.0
            self._metrics["train"]["sar/step_share"].append(share)
            self._sar_seconds_in_step = 0.0
            self._sar_step_seconds = 0.0
        return output
