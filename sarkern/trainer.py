"""GRPO with the Self-Aligned Reward: TRL's `GRPOTrainer` with SAR as one more weighted, logged reward.

SAR costs at most one extra no-grad pass per generation batch. When the trainer already has the conditioned
per-token log-probs of the completions (TRL's old log-probs, computed when generation and optimisation steps are
misaligned; or exact sampling log-probs from vLLM at temperature 1 without top-k, top-p, min-p or repetition
penalty), the scorer reuses them and runs only the unconditioned half. Otherwise the conditioned and unconditioned
sequences share one packed forward (`sarkern.SARScorer`).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from trl import GRPOConfig, GRPOTrainer

from .rundir import AtomicCheckpoints
from .sar import validate_sar_options
from .scorer import DEFAULT_MAX_TOKENS_PER_PASS, SARScorer

__all__ = ["SARGRPOConfig", "SARGRPOTrainer"]


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
    sar_placeholder_ids: list[int] | None = field(
        default=None, metadata={"help": "Token ids of the placeholder prompt (default: built from the chat template)."}
    )
    sar_max_tokens_per_pass: int = field(
        default=DEFAULT_MAX_TOKENS_PER_PASS, metadata={"help": "Tokens per packed scoring forward."}
    )
    sar_reuse_logprobs: bool = field(
        default=True,
        metadata={"help": "Reuse the trainer's conditioned log-probs when it has exact ones (skips half the pass)."},
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

    Logged each step, besides TRL's own metrics (`rewards/sar/mean` among them): `sar/ppl_cond`,
    `sar/ppl_uncond`, `sar/cond_reused` (1 when the conditioned log-probs came from the trainer), `sar/seconds`
    and `sar/step_share` (SAR's share of the wall time of the training step). SAR is not computed at evaluation.
    """

    def __init__(self, model, reward_funcs=None, args: SARGRPOConfig | None = None, **kwargs):
        if args is None:
            raise ValueError("SARGRPOTrainer needs an SARGRPOConfig (args=...)")
        if not isinstance(args, SARGRPOConfig):
            raise TypeError(f"args must be an SARGRPOConfig, got {type(args).__name__}")
        if reward_funcs is None:
            reward_funcs = []
        elif not isinstance(reward_funcs, list):
            reward_funcs = [reward_funcs]
        user_weights = args.reward_weights if args.reward_weights is not None else [1.0] * len(reward_funcs)
        if len(user_weights) != len(reward_funcs):
            raise ValueError(f"{len(user_weights)} reward_weights for {len(reward_funcs)} reward functions")
        args = copy.copy(args)  # the caller's config keeps its own reward_weights
        # sar_weight = 0 is plain GRPO: no SAR reward function, no scorer, no extra pass.
        self.sar_enabled = args.sar_weight != 0.0
        if self.sar_enabled:
            reward_funcs = [*reward_funcs, _SARRewardFunction(self)]
            user_weights = [*user_weights, args.sar_weight]
        args.reward_weights = list(user_weights)
        super().__init__(model=model, reward_funcs=reward_funcs, args=args, **kwargs)
        self._sar_batch: dict[str, Any] = {}
        self._sar_capture_old_logps = False
        self._sar_seconds_in_step = 0.0
        self.sar_calls = {"scored": 0, "cond_reused": 0}
        self.sar_scorer = None
        if not self.sar_enabled:
            return
        self.sar_scorer = SARScorer(
            self.accelerator.unwrap_model(self.model),
            self.processing_class,
            placeholder_ids=args.sar_placeholder_ids,
            temperature=args.temperature,
            max_tokens_per_pass=args.sar_max_tokens_per_pass,
            use_log=args.sar_use_log,
            use_denominator=args.sar_use_denominator,
            use_comparison=args.sar_use_comparison,
            clip_value=args.sar_clip_value,
        )

    # --------------------------------------------------------------- capturing what the trainer already computed

    def _sampling_logprobs_exact(self) -> bool:
        """Sampling log-probs equal log p(a_t | q, a_<t) only for plain sampling at temperature 1."""
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

    def _generate(self, prompts):
        output = super()._generate(prompts)
        if not self.sar_enabled:
            return output
        prompt_ids, completion_ids, _tool_mask, _completions, sampling_logps = output[:5]
        self._sar_batch = {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "old_logps": None}
        # Tool results and rollout functions put log-probs of 0 (or anything) on tokens the policy did not sample,
        # and vLLM may leave some out: reuse only plain, complete sampling log-probs.
        plain_sampling = not self.tools and self.rollout_func is None and self.environment_factories is None
        if sampling_logps is not None and plain_sampling and self._sampling_logprobs_exact():
            rows = [torch.tensor([math.nan if x is None else x for x in row]) for row in sampling_logps]
            if not any(bool(torch.isnan(row).any()) for row in rows):
                self._sar_batch["sampling_logps"] = rows
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

    def _sar_rewards(self, completion_ids: list[list[int]]) -> list[float | None]:
        mode = "train" if self.model.training else "eval"
        if mode == "eval":
            return [None] * len(completion_ids)  # SAR shapes training only
        batch = self._sar_batch
        if batch.get("completion_ids") is None or len(batch["completion_ids"]) != len(completion_ids):
            raise RuntimeError("SAR reward called outside SARGRPOTrainer's generation step")
        cond_logprobs = None
        # With mask_truncated_completions, TRL scores truncated completions as fully masked (log-prob 0 per token).
        eos_and_pad = {*self.eos_token_ids, self._tokenizer.pad_token_id}
        truncated = any(not ids or ids[-1] not in eos_and_pad for ids in completion_ids)
        if self.args.sar_reuse_logprobs and not (self.mask_truncated_completions and truncated):
            if batch.get("old_logps") is not None:
                cond_logprobs = batch["old_logps"]
            elif batch.get("sampling_logps") is not None:
                cond_logprobs = batch["sampling_logps"]
        start = time.perf_counter()
        scores = self.sar_scorer.score(batch["prompt_ids"], completion_ids, cond_logprobs=cond_logprobs)
        seconds = time.perf_counter() - start
        self._sar_seconds_in_step += seconds
        self.sar_calls["scored"] += 1
        self.sar_calls["cond_reused"] += int(cond_logprobs is not None)

        valid = scores.valid
        metrics = self._metrics[mode]
        metrics["sar/ppl_cond"].append(scores.ppl_cond[valid].mean().item() if valid.any() else math.nan)
        if self.args.sar_use_comparison:
            metrics["sar/ppl_uncond"].append(scores.ppl_uncond[valid].mean().item() if valid.any() else math.nan)
        metrics["sar/cond_reused"].append(float(cond_logprobs is not None))
        metrics["sar/seconds"].append(seconds)
        return [None if math.isnan(r) else r for r in scores.reward.tolist()]

    def training_step(self, model, inputs, num_items_in_batch):
        start = time.perf_counter()
        output = super().training_step(model, inputs, num_items_in_batch)
        self._sar_step_seconds = getattr(self, "_sar_step_seconds", 0.0) + time.perf_counter() - start
        if self.sar_enabled and self._step % self.current_gradient_accumulation_steps == 0:
            share = self._sar_seconds_in_step / self._sar_step_seconds if self._sar_step_seconds > 0 else 0.0
            self._metrics["train"]["sar/step_share"].append(share)
            self._sar_seconds_in_step = 0.0
            self._sar_step_seconds = 0.0
        return output
