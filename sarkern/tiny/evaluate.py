"""Greedy-decoding accuracy of a causal LM on held-out problems, as `sarkern.rewards.correctness_reward` scores them."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from datasets import Dataset
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from sarkern.rewards import correctness_reward
from sarkern.tasks import synthetic_arithmetic_dataset


@dataclass
class EvalResult:
    """Outcome of `evaluate_accuracy` (with sampling, `num_problems` counts every sampled completion)."""

    accuracy: float
    num_correct: int
    num_problems: int
    mean_completion_tokens: float
    num_truncated: int = 0  # completions cut off by `max_new_tokens` before a stop token
    completions: list[str] = field(repr=False, default_factory=list)


def _stop_ids(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase) -> list[int]:
    configured = model.generation_config.eos_token_id
    ids = configured if isinstance(configured, list) else [configured] if configured is not None else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    return ids


@torch.inference_mode()
def evaluate_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    dataset: Dataset | None = None,
    *,
    num_problems: int = 50,
    seed: int = 0,
    batch_size: int = 64,
    max_new_tokens: int = 200,
    num_samples: int = 0,
    temperature: float = 1.0,
    sampling_seed: int = 0,
) -> EvalResult:
    """Accuracy of greedy completions on `dataset` (columns `prompt`, `answer`).

    Without a dataset, `num_problems` problems of the synthetic task's test split drawn with `seed`, which never
    occur in its train split. Prompts are chat messages rendered with the tokenizer's chat template.

    With `num_samples > 0`, `num_samples` completions per problem are sampled at `temperature` instead (torch's
    generator seeded with `sampling_seed`), and the accuracy and mean length are over all of them.
    """
    if num_samples < 0 or not temperature > 0:
        raise ValueError(f"need num_samples >= 0 and temperature > 0, got {num_samples} and {temperature}")
    if dataset is None:
        dataset = synthetic_arithmetic_dataset(num_problems, seed, split="test")
    if num_samples:
        repeated = [i for i in range(len(dataset)) for _ in range(num_samples)]
        dataset = dataset.select(repeated)
    # Plain sampling (no top-k/top-p truncation), as GRPO samples during training.
    decoding = {"temperature": temperature, "top_k": 0, "top_p": 1.0} if num_samples else {}
    was_training = model.training
    model.eval()
    stop_ids = _stop_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    padding_side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # generation continues at the right edge of every row
    completions: list[str] = []
    num_tokens = num_truncated = 0
    devices = [model.device] if model.device.type == "cuda" else []
    # Sampling draws from torch's global generator: seed it here without disturbing the caller's random state.
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(sampling_seed)
        try:
            for start in range(0, len(dataset), batch_size):
                prompts = dataset["prompt"][start : start + batch_size]
                batch = tokenizer.apply_chat_template(
                    prompts, add_generation_prompt=True, padding=True, return_tensors="pt", return_dict=True
                )
                batch = {k: v.to(model.device) for k, v in batch.items()}
                output = model.generate(
                    **batch,
                    do_sample=bool(num_samples),
                    **decoding,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=stop_ids,
                    pad_token_id=pad_id,
                )
                new_tokens = output[:, batch["input_ids"].shape[1] :]
                # Tokens up to and including the first stop token; what follows is padding.
                is_stop = torch.isin(new_tokens, torch.tensor(stop_ids, device=new_tokens.device))
                stopped_before = is_stop.cumsum(dim=1) - is_stop.long()
                num_tokens += int((stopped_before == 0).sum())
                num_truncated += int((~is_stop.any(dim=1)).sum())
                completions.extend(tokenizer.batch_decode(new_tokens, skip_special_tokens=True))
        finally:
            tokenizer.padding_side = padding_side
            model.train(was_training)
    scores = correctness_reward(prompts=dataset["prompt"], completions=completions, answer=dataset["answer"])
    num_correct = int(sum(scores))
    total = len(completions)
    return EvalResult(
        accuracy=num_correct / total if total else 0.0,
        num_correct=num_correct,
        num_problems=total,
        mean_completion_tokens=num_tokens / total if total else 0.0,
        num_truncated=num_truncated,
        completions=completions,
    )
