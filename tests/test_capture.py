"""Sampling log-probs captured during transformers' `generate`: equal to a fresh forward within the dtype's bound,
taken from the raw logits at the given temperature, one step in memory, misalignment refused."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from sarkern.capture import (
    CAPTURE_NLL_BOUNDS,
    CaptureMismatchError,
    SamplingLogprobCapture,
    capture_sampling_logprobs,
)
from sarkern.tasks import synthetic_arithmetic_dataset
from sarkern.tiny import TINY_MODEL_DIR

EOS, PAD = 3, 0


@pytest.fixture(scope="module")
def tiny():
    tokenizer = AutoTokenizer.from_pretrained(TINY_MODEL_DIR)
    model = AutoModelForCausalLM.from_pretrained(TINY_MODEL_DIR).float().eval()
    data = synthetic_arithmetic_dataset(8, seed=3)
    prompts = []
    for i in range(4):
        ids = tokenizer.apply_chat_template(data[i]["prompt"], add_generation_prompt=True, return_dict=False)
        prompts += [list(ids)] * 2
    assert len({len(p) for p in prompts}) > 1  # prompts of several lengths: the batch is left-padded
    return model, prompts


def generate(model, prompts, *, temperature, autocast_dtype=None, max_new_tokens=40, **sampling):
    """TRL's transformers path: left-padded prompts, sampling, completions cut after their first EOS."""
    width = max(map(len, prompts))
    input_ids = torch.tensor([[PAD] * (width - len(p)) + p for p in prompts])
    attention_mask = (input_ids != PAD).long()
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=True, temperature=temperature, pad_token_id=PAD, eos_token_id=[EOS],
        disable_compile=True, **sampling,
    )  # fmt: skip
    autocast = torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None)
    torch.manual_seed(0)
    with torch.no_grad(), autocast, capture_sampling_logprobs(model, temperature) as capture:
        out = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
    completions = []
    for row in out[:, width:].tolist():
        cut = row.index(EOS) + 1 if EOS in row else len(row)
        completions.append(row[:cut])
    return capture, completions


def fresh_logprobs(model, prompt, completion, temperature, autocast_dtype=None, dtype=torch.float32):
    ids = torch.tensor([prompt + completion])
    autocast = torch.autocast("cpu", dtype=autocast_dtype, enabled=autocast_dtype is not None)
    with torch.no_grad(), autocast:
        logits = model.to(dtype)(input_ids=ids).logits[0].to(dtype)
    model.float()
    logp = torch.log_softmax(logits / temperature, dim=-1)[len(prompt) - 1 : len(prompt) - 1 + len(completion)]
    return logp.gather(1, torch.tensor(completion)[:, None]).squeeze(1)


@pytest.mark.parametrize("autocast_dtype", [None, torch.bfloat16], ids=["fp32", "bf16-autocast"])
def test_captured_logprobs_equal_a_fresh_forward(tiny, autocast_dtype):
    model, prompts = tiny
    temperature = 0.8
    capture, completions = generate(model, prompts, temperature=temperature, autocast_dtype=autocast_dtype)
    captured = capture.per_completion(completions)
    precision = torch.float32 if autocast_dtype is None else autocast_dtype
    bound = CAPTURE_NLL_BOUNDS[precision]
    for prompt, completion, got in zip(prompts, completions, captured):
        assert got.dtype == torch.float32 and got.shape == (len(completion),)
        fresh = fresh_logprobs(model, prompt, completion, temperature, autocast_dtype)
        # SAR uses the mean NLL of each completion: that is what the bound is on.
        assert abs(got.mean().item() - fresh.mean().item()) <= bound
        if autocast_dtype is None:
            # fp32: the cached decoding and the full forward differ only in summation order.
            torch.testing.assert_close(got, fresh, atol=1e-4, rtol=0)
        # And the captured values are as close to the exact (float64) log-probs as a fresh forward of that precision.
        exact = fresh_logprobs(model, prompt, completion, temperature, dtype=torch.float64)
        fresh_error = (fresh.double() - exact).mean().abs().item()
        assert (got.double() - exact).mean().abs().item() <= fresh_error + bound


def test_capture_sees_the_raw_logits_before_every_processor(tiny):
    """With top-k, top-p and a repetition penalty, the captured log-probs are still the policy's own distribution
    at the temperature (the processors change what is sampled, not what SAR measures)."""
    model, prompts = tiny
    capture, completions = generate(
        model, prompts[:2], temperature=1.3, top_k=5, top_p=0.9, repetition_penalty=1.5, max_new_tokens=12
    )
    for prompt, completion, got in zip(prompts, completions, capture.per_completion(completions)):
        torch.testing.assert_close(got, fresh_logprobs(model, prompt, completion, 1.3), atol=1e-4, rtol=0)
    # One step of log-probs in memory: [batch, vocab], never [steps, batch, vocab].
    assert capture._last.shape == (2, model.config.vocab_size)
    assert all(step.shape == (2,) for step in capture._logprobs)


def test_patch_is_removed_after_the_block(tiny):
    model, _ = tiny
    with capture_sampling_logprobs(model):
        assert "_get_logits_processor" in vars(model)
    assert "_get_logits_processor" not in vars(model)


def test_misaligned_or_missing_captures_fail_loudly(tiny):
    model, prompts = tiny
    with pytest.raises(CaptureMismatchError, match="saw no generation step"):
        SamplingLogprobCapture().per_completion([[5, 3]])
    capture, completions = generate(model, prompts[:2], temperature=1.0, max_new_tokens=6)
    shifted = [[c[0], *c][: len(c)] if len(c) > 1 else [c[0] + 1] for c in completions]
    with pytest.raises(CaptureMismatchError, match="differs from the tokens sampled"):
        capture.per_completion(shifted)
    with pytest.raises(CaptureMismatchError, match="sequences for 1 completions"):
        capture.per_completion(completions[:1])
    with pytest.raises(CaptureMismatchError, match="only 6 steps were captured"):
        capture.per_completion([c + [5] * 10 for c in completions])
    with pytest.raises(CaptureMismatchError, match="no transformers generation module"):
        with capture_sampling_logprobs(torch.nn.Linear(2, 2)):
            pass
