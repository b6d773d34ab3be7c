"""SARScorer against naive per-sample forwards, for every supported architecture, plus its contract on bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from attention_reference import assert_attention_close
from scorer_models import (
    ARCHITECTURES,
    MAX_POSITIONS,
    MODEL_VOCAB,
    chat_tokenizer,
    fp32_nll_tolerance,
    naive_perplexity,
    naive_token_logprobs,
    plain_tokenizer,
    random_ids,
    tiny_model,
)

from sarkern import attention
from sarkern.attention import AttentionSegment, PackedLayout, shared_prefix_attention
from sarkern.placeholder import build_placeholder_ids
from sarkern.sar import SELF_CONFIDENCE_OFFSET, sar_reward
from sarkern.scorer import SARScorer, SelfAlignedReward

PLACEHOLDER = [4, 36, 34, 20, 33, 102, 5, 102, 4, 16]  # any ids will do; a chat-template one in other tests


def mixed_batch(seed: int = 0):
    """Several groups of different sizes, interleaved, prompts of different lengths, one-token completions."""
    g = torch.Generator().manual_seed(seed)
    prompt_a, prompt_b, prompt_c, prompt_d = (random_ids(g, n) for n in (13, 4, 9, 1))
    prompts = [prompt_a, prompt_a, prompt_b, prompt_a, prompt_c, prompt_c, prompt_d, prompt_b]
    lengths = [7, 1, 11, 3, 1, 16, 5, 2]
    completions = [random_ids(g, n) for n in lengths]
    return prompts, completions


def tolerance(model, prompts, completions, temperature: float = 1.0, placeholder=PLACEHOLDER) -> float:
    """The fp32 bound on a mean NLL of this batch (``fp32_nll_tolerance``): each score may be this far from the
    float64 reference, and two fp32 scores of the same sequence (summed in different orders) twice as far."""
    longest = max(len(p) + len(c) for p, c in zip(prompts, completions))
    longest = max(longest, len(placeholder) + max(map(len, completions)))
    return fp32_nll_tolerance(model, longest, temperature)


def assert_ppl_close(actual: torch.Tensor, expected, tol: float) -> None:
    """Perplexities compared as mean NLLs: |log actual - log expected| <= tol."""
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual.double().log(), expected.log(), rtol=0.0, atol=tol)


def assert_reward_close(actual: torch.Tensor, expected, tol: float) -> None:
    """SAR = -expm1(nll_c - nll_u): mean NLLs each within ``tol`` move it by at most (1 - SAR) * 2 tol, to first
    order (the factor 1 + 4 tol covers the second)."""
    expected = torch.as_tensor(expected, dtype=torch.float64)
    bound = (1 - expected).abs() * 2 * tol * (1 + 4 * tol)
    error = (actual.double() - expected).abs()
    assert (error <= bound).all(), f"SAR off by {error.tolist()}, allowed {bound.tolist()}"


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def arch_model(request):
    return request.param, tiny_model(request.param)


def test_matches_naive_forwards(arch_model):
    _arch, model = arch_model
    prompts, completions = mixed_batch()
    scores = SARScorer(model, placeholder_ids=PLACEHOLDER).score(prompts, completions)
    assert scores.scoring_path == "packed"
    cond = [naive_perplexity(model, p, c) for p, c in zip(prompts, completions)]
    uncond = [naive_perplexity(model, PLACEHOLDER, c) for c in completions]
    tol = tolerance(model, prompts, completions)
    assert_ppl_close(scores.ppl_cond, cond, tol)
    assert_ppl_close(scores.ppl_uncond, uncond, tol)
    assert_reward_close(scores.reward, sar_reward(torch.tensor(cond), torch.tensor(uncond)), tol)
    assert scores.num_tokens.tolist() == [float(len(c)) for c in completions]
    assert scores.valid.all()
    for field in (scores.reward, scores.ppl_cond, scores.ppl_uncond, scores.num_tokens):
        assert field.dtype == torch.float32 and field.shape == (len(completions),)


def test_split_passes_give_the_same_scores(arch_model):
    _, model = arch_model
    prompts, completions = mixed_batch(seed=1)
    whole = SARScorer(model, placeholder_ids=PLACEHOLDER).score(prompts, completions)
    tol = tolerance(model, prompts, completions)
    for budget in (1, 12, 30):
        split = SARScorer(model, placeholder_ids=PLACEHOLDER, max_tokens_per_pass=budget).score(prompts, completions)
        assert_ppl_close(split.ppl_cond, whole.ppl_cond, 2 * tol)
        assert_ppl_close(split.ppl_uncond, whole.ppl_uncond, 2 * tol)


def test_long_sequences_beyond_the_sliding_window_and_temperature():
    model = tiny_model("mistral")
    g = torch.Generator().manual_seed(3)
    prompts = [random_ids(g, 40)] * 2 + [random_ids(g, 3)]
    completions = [random_ids(g, n) for n in (60, 25, 70)]
    scores = SARScorer(model, placeholder_ids=PLACEHOLDER, temperature=0.7).score(prompts, completions)
    tol = tolerance(model, prompts, completions, temperature=0.7)
    assert_ppl_close(scores.ppl_cond, [naive_perplexity(model, p, c, 0.7) for p, c in zip(prompts, completions)], tol)
    assert_ppl_close(scores.ppl_uncond, [naive_perplexity(model, PLACEHOLDER, c, 0.7) for c in completions], tol)


def test_the_reference_is_sensitive_to_what_the_scorer_could_get_wrong():
    """Guards the tests themselves: the errors a packed scorer can make move the scores far beyond the tolerance."""
    model = tiny_model("qwen2")
    g = torch.Generator().manual_seed(4)
    prompt, completion = random_ids(g, 12), random_ids(g, 10)
    exact = naive_perplexity(model, prompt, completion)
    far = 10 * tolerance(model, [prompt], [completion])
    # Prefix cut (a completion not attending to its prompt).
    assert abs(math.log(naive_perplexity(model, prompt[-1:], completion) / exact)) > far
    # Off by one: each token scored from its own hidden state instead of the previous one.
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([prompt + completion])).logits[0].double(), -1)
    shifted = logp[12:22].gather(-1, torch.tensor(completion).unsqueeze(-1))
    assert abs(-shifted.mean().item() - math.log(exact)) > far
    # Completion positions restarting at 0 instead of continuing after the prompt (explicit causal mask, so that
    # transformers does not split the sequence at the position jump).
    ids = torch.tensor([prompt + completion])
    positions = torch.tensor([list(range(12)) + list(range(10))])
    causal = torch.full((22, 22), float("-inf")).triu(1)[None, None]
    model.set_attn_implementation("eager")
    with torch.no_grad():
        logits = model(input_ids=ids, position_ids=positions, attention_mask=causal).logits[0].double()
    model.set_attn_implementation("sdpa")
    nll = -torch.log_softmax(logits, -1)[11:21].gather(-1, torch.tensor(completion).unsqueeze(-1)).mean().item()
    assert abs(nll - math.log(exact)) > far


def test_cond_logprobs_skip_the_conditioned_half():
    model = tiny_model("llama")
    prompts, completions = mixed_batch(seed=2)
    naive = [naive_token_logprobs(model, p, c).float() for p, c in zip(prompts, completions)]
    fed_tokens = []
    scorer = SARScorer(model, placeholder_ids=PLACEHOLDER)
    scorer.verify()  # the first-use probe, before counting
    hook = model.get_decoder().register_forward_hook(
        lambda m, args, kwargs, out: fed_tokens.append(kwargs["input_ids"].shape[1]), with_kwargs=True
    )
    try:
        from_list = scorer.score(prompts, completions, cond_logprobs=naive)
    finally:
        hook.remove()
    # Only the placeholder half ran: one placeholder prefix, then each completion without its last token.
    assert fed_tokens == [len(PLACEHOLDER) + sum(len(c) - 1 for c in completions)]
    full = scorer.score(prompts, completions)
    tol = tolerance(model, prompts, completions)
    assert_ppl_close(from_list.ppl_cond, full.ppl_cond, 2 * tol)
    assert_ppl_close(from_list.ppl_uncond, full.ppl_uncond, 2 * tol)
    assert_reward_close(from_list.reward, full.reward, 2 * tol)

    # The trainer's form: padded [B, L] log-probs plus the completion mask, with padded completion ids.
    width = max(len(c) for c in completions) + 3
    padded = torch.zeros(len(completions), width)
    ids = torch.zeros(len(completions), width, dtype=torch.long)
    mask = torch.zeros(len(completions), width, dtype=torch.long)
    for i, (c, lp) in enumerate(zip(completions, naive)):
        padded[i, : len(c)], ids[i, : len(c)], mask[i, : len(c)] = lp, torch.tensor(c), 1
    from_tensor = scorer.score(prompts, ids, completion_mask=mask, cond_logprobs=padded)
    assert_ppl_close(from_tensor.ppl_cond, from_list.ppl_cond, 2 * tol)
    # Without a mask, the first len(completion) entries of each row are used.
    from_rows = scorer.score(prompts, completions, cond_logprobs=padded)
    assert_ppl_close(from_rows.ppl_cond, from_list.ppl_cond, 2 * tol)


def test_padded_tensor_inputs_with_masks():
    model = tiny_model("qwen3")
    prompts, completions = mixed_batch(seed=5)
    scorer = SARScorer(model, placeholder_ids=PLACEHOLDER)
    expected = scorer.score(prompts, completions)
    width_p, width_c = max(map(len, prompts)), max(map(len, completions))
    prompt_ids = torch.zeros(len(prompts), width_p, dtype=torch.long)
    prompt_mask = torch.zeros_like(prompt_ids)
    completion_ids = torch.zeros(len(prompts), width_c, dtype=torch.long)
    completion_mask = torch.zeros_like(completion_ids)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        prompt_ids[i, width_p - len(p) :], prompt_mask[i, width_p - len(p) :] = torch.tensor(p), 1  # left padded
        completion_ids[i, : len(c)], completion_mask[i, : len(c)] = torch.tensor(c), 1  # right padded
    got = scorer.score(prompt_ids, completion_ids, prompt_mask=prompt_mask, completion_mask=completion_mask)
    tol = tolerance(model, prompts, completions)
    assert_ppl_close(got.ppl_cond, expected.ppl_cond, 2 * tol)
    assert_ppl_close(got.ppl_uncond, expected.ppl_uncond, 2 * tol)


def test_self_confidence_variant_runs_no_unconditioned_pass():
    model = tiny_model("qwen2")
    prompts, completions = mixed_batch(seed=6)
    calls = []
    scorer = SARScorer(model, use_comparison=False, use_denominator=False)
    scorer.verify()  # the first-use probe, before counting
    hook = model.get_decoder().register_forward_hook(lambda *a: calls.append(1))
    try:
        scores = scorer.score(prompts, completions)
    finally:
        hook.remove()
    assert len(calls) == 1
    assert torch.isnan(scores.ppl_uncond).all()
    cond = torch.tensor([naive_perplexity(model, p, c) for p, c in zip(prompts, completions)], dtype=torch.float64)
    assert_ppl_close(SELF_CONFIDENCE_OFFSET - scores.reward.double(), cond, tolerance(model, prompts, completions))


def test_placeholder_from_the_tokenizer_and_per_call_override():
    model = tiny_model("llama")
    tokenizer = chat_tokenizer()
    prompts, completions = mixed_batch(seed=7)
    scorer = SARScorer(model, tokenizer)
    placeholder = build_placeholder_ids(tokenizer)
    assert scorer.placeholder_ids == placeholder
    scores = scorer.score(prompts, completions)
    # One placeholder per completion (e.g. each keeping its prompt's system message).
    other = build_placeholder_ids(tokenizer, system_message="be brief")
    tol = tolerance(model, prompts, completions, placeholder=max(placeholder, other, key=len))
    assert_ppl_close(scores.ppl_uncond, [naive_perplexity(model, placeholder, c) for c in completions], tol)
    per_row = [other if i % 2 else placeholder for i in range(len(completions))]
    mixed = scorer.score(prompts, completions, placeholder_ids=per_row)
    assert_ppl_close(mixed.ppl_uncond, [naive_perplexity(model, ph, c) for ph, c in zip(per_row, completions)], tol)


def test_model_state_is_restored_and_dropout_is_off():
    model = tiny_model("qwen2", attention_dropout=0.5)
    model.set_attn_implementation("eager")
    model.train()
    model.model.layers[0].eval()  # a mixed state must come back as it was
    before = {name: module.training for name, module in model.named_modules()}
    prompts, completions = mixed_batch(seed=8)
    scores = SARScorer(model, placeholder_ids=PLACEHOLDER).score(prompts, completions)
    assert {name: module.training for name, module in model.named_modules()} == before
    assert model.config._attn_implementation == "eager"
    assert scores.reward.grad_fn is None and scores.ppl_cond.grad_fn is None
    model.eval()
    expected = [naive_perplexity(model, p, c) for p, c in zip(prompts, completions)]
    assert_ppl_close(scores.ppl_cond, expected, tolerance(model, prompts, completions))


def test_state_is_restored_when_scoring_fails(monkeypatch):
    model = tiny_model("llama")
    model.train()
    scorer = SARScorer(model, placeholder_ids=PLACEHOLDER)
    scorer.verify()  # the probe, before the failure is injected
    from sarkern.scoring_model import ScoringModel

    monkeypatch.setattr(ScoringModel, "perplexities", lambda *a: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        scorer.score([[1, 2]], [[3, 4]])
    assert model.training and model.config._attn_implementation == "sdpa"


# ------------------------------------------------------------------------------------------------------ bad input


@pytest.fixture(scope="module")
def scorer():
    return SARScorer(tiny_model("llama"), placeholder_ids=PLACEHOLDER)


def test_count_mismatch(scorer):
    with pytest.raises(ValueError, match="got 2 prompts and 3 completions"):
        scorer.score([[7, 8], [9]], [[10], [11], [12]])


@pytest.mark.parametrize(
    "prompts, completions, message",
    [
        ([[7, MODEL_VOCAB]], [[10]], rf"prompt_ids\[0\] holds token id {MODEL_VOCAB}, outside the model's vocabulary"),
        ([[7]], [[10, -1]], r"completion_ids\[0\] holds token id -1, outside"),
        ([[7]], [[10, 10**9]], r"completion_ids\[0\] holds token id 1000000000, outside"),
        ([[]], [[10]], r"prompt_ids\[0\] is empty"),
        ([[7]], [[1.5]], r"must hold integer token ids"),
        ([[7]], "abc", r"must be a list of token-id sequences"),
    ],
)
def test_bad_ids(scorer, prompts, completions, message):
    with pytest.raises((ValueError, TypeError), match=message):
        scorer.score(prompts, completions)


def test_too_long(scorer):
    prompt = [7] * 100
    with pytest.raises(
        ValueError,
        match=rf"prompt 0 \+ completion 0 is {MAX_POSITIONS + 1} tokens, "
        rf"more than .*max_position_embeddings \({MAX_POSITIONS}\)",
    ):
        scorer.score([prompt], [[8] * (MAX_POSITIONS + 1 - 100)])
    with pytest.raises(ValueError, match="placeholder prompt 0 \\+ completion 0"):
        scorer.score([[7]], [[8] * (MAX_POSITIONS - 5)])


def test_empty_completion_is_nan_with_a_flag(scorer):
    prompts, completions = [[7, 8], [7, 8], [9]], [[10, 11], [], [12]]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no empty segment ever reaches the op
        scores = scorer.score(prompts, completions)
    assert scores.valid.tolist() == [True, False, True]
    assert math.isnan(scores.reward[1]) and math.isnan(scores.ppl_cond[1]) and math.isnan(scores.ppl_uncond[1])
    assert scores.num_tokens.tolist() == [2.0, 0.0, 1.0]
    alone = scorer.score([[7, 8], [9]], [[10, 11], [12]])
    assert_reward_close(scores.reward[[0, 2]], alone.reward, 2 * tolerance(scorer.model, prompts, completions))
    strict = SARScorer(scorer.model, placeholder_ids=PLACEHOLDER, empty_completions="raise")
    with pytest.raises(ValueError, match=r"completion_ids\[1\] is empty"):
        strict.score(prompts, completions)


def test_bad_cond_logprobs(scorer):
    with pytest.raises(ValueError, match=r"cond_logprobs\[0\] has 1 log-probs for a completion of 2 tokens"):
        scorer.score([[7]], [[8, 9]], cond_logprobs=[torch.tensor([-1.0])])
    with pytest.raises(ValueError, match="must hold log-probabilities"):
        scorer.score([[7]], [[8, 9]], cond_logprobs=[torch.tensor([-1.0, 0.5])])
    with pytest.raises(ValueError, match="fewer than the longest completion"):
        scorer.score([[7]], [[8, 9]], cond_logprobs=torch.zeros(1, 1))


def test_bad_options():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="temperature"):
        SARScorer(model, placeholder_ids=PLACEHOLDER, temperature=0.0)
    with pytest.raises(ValueError, match="max_tokens_per_pass"):
        SARScorer(model, placeholder_ids=PLACEHOLDER, max_tokens_per_pass=0)
    with pytest.raises(ValueError, match="use_denominator=False"):
        SARScorer(model, placeholder_ids=PLACEHOLDER, use_comparison=False)
    with pytest.raises(ValueError, match="tokenizer or placeholder_ids"):
        SARScorer(model)
    with pytest.raises(ValueError, match="outside the model's vocabulary"):
        SARScorer(model, placeholder_ids=[MODEL_VOCAB + 1])


# -------------------------------------------------------------------------------------------- attention function


@pytest.mark.parametrize("expand_kv", [False, True], ids=["native-gqa", "expanded-kv"])
@pytest.mark.parametrize("window", [None, 1, 3, 50])
@pytest.mark.parametrize("max_mask_elements", [1, 40, 1 << 24])
def test_attention_function_against_dense_reference(window, max_mask_elements, expand_kv, monkeypatch):
    if expand_kv:  # the path of devices whose masked SDPA kernel needs as many K/V heads as query heads
        monkeypatch.setattr(attention, "_NATIVE_GQA_DEVICES", ())
    g = torch.Generator().manual_seed(0)
    # Two groups: prefix 5 with completions of 7, 0 and 3 rows; prefix 1 with one of 4 rows.
    segments = (
        AttentionSegment(0, 5),
        AttentionSegment(5, 7, 0, 5),
        AttentionSegment(12, 0, 0, 5),
        AttentionSegment(12, 3, 0, 5),
        AttentionSegment(15, 1),
        AttentionSegment(16, 4, 15, 1),
    )
    layout = PackedLayout(segments, total_len=20, backend="sdpa", max_mask_elements=max_mask_elements)
    q = torch.randn(1, 4, 20, 8, generator=g)
    k, v = torch.randn(1, 2, 20, 8, generator=g), torch.randn(1, 2, 20, 8, generator=g)
    module = torch.nn.Module()
    mask_sizes = []
    real_sdpa = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        if kwargs.get("attn_mask") is not None:
            mask_sizes.append(kwargs["attn_mask"].numel())
        return real_sdpa(*args, **kwargs)

    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", spy)
    out, weights = shared_prefix_attention(
        module, q, k, v, None, scaling=0.4, sliding_window=window, sarkern_layout=layout
    )
    assert weights is None
    assert_attention_close(out, q, k, v, layout, 0.4, window)
    # Mask blocks are per segment and chunk, never [T, T].
    assert max(mask_sizes, default=0) < 20 * 20
    if max_mask_elements == 1:
        assert max(mask_sizes, default=0) <= 13  # one query row at a time: at most prefix + own rows


def test_attention_function_refuses_what_it_cannot_do():
    layout = PackedLayout((AttentionSegment(0, 3),), total_len=3)
    q = k = v = torch.zeros(1, 2, 3, 4)
    module = torch.nn.Module()
    with pytest.raises(RuntimeError, match="only runs inside sarkern.SARScorer"):
        shared_prefix_attention(module, q, k, v, None)
    with pytest.raises(RuntimeError, match="extra attention_mask"):
        shared_prefix_attention(module, q, k, v, torch.zeros(1, 1, 3, 3), sarkern_layout=layout)
    with pytest.raises(RuntimeError, match="dropout"):
        shared_prefix_attention(module, q, k, v, None, dropout=0.1, sarkern_layout=layout)
    with pytest.raises(ValueError, match="softcap must be positive"):
        shared_prefix_attention(module, q, k, v, None, softcap=-1.0, sarkern_layout=layout)
    with pytest.raises(ValueError, match="tile the packed rows"):
        PackedLayout((AttentionSegment(1, 3),), total_len=4)


def test_no_dense_mask_is_built_by_the_model(monkeypatch):
    """transformers must not build any [T, T] mask (nor detect 'packed sequences') for the scorer's forward."""
    from transformers import masking_utils

    built = []
    for name in ("sdpa_mask", "eager_mask", "flex_attention_mask", "flash_attention_mask"):
        real = getattr(masking_utils, name)
        monkeypatch.setitem(
            masking_utils.ALL_MASK_ATTENTION_FUNCTIONS._global_mapping,
            {
                "sdpa_mask": "sdpa",
                "eager_mask": "eager",
                "flex_attention_mask": "flex_attention",
                "flash_attention_mask": "flash_attention_2",
            }[name],
            lambda *a, _real=real, **k: built.append(1) or _real(*a, **k),
        )
    model = tiny_model("mistral")
    prompts, completions = mixed_batch(seed=9)
    scorer = SARScorer(model, placeholder_ids=PLACEHOLDER)
    scorer.verify()  # the probe's per-sample reference forwards build ordinary masks
    built.clear()
    scorer.score(prompts, completions)
    assert built == []
    with torch.no_grad():
        model(input_ids=torch.tensor([prompts[0] + completions[0]]))
    assert built, "the spy must see the masks of an ordinary forward"


# ------------------------------------------------------------------------------------------------ reward function


def test_self_aligned_reward_like_trl_calls_it():
    pytest.importorskip("trl")
    model = tiny_model("qwen2")
    tokenizer = chat_tokenizer()
    reward_fn = SelfAlignedReward(model, tokenizer)
    from trl.trainer.utils import get_callable_name, is_async_callable

    assert get_callable_name(reward_fn) == "sar"  # TRL logs rewards/sar/...
    assert not is_async_callable(reward_fn) and not isinstance(reward_fn, torch.nn.Module)
    system = {"role": "system", "content": "be brief"}
    question_a = [{"role": "user", "content": "1+1?"}]
    question_b = [system, {"role": "user", "content": "2+3?"}]
    prompts = [question_a, question_a, question_b, question_b]
    completion_ids = [
        tokenizer("2<|im_end|>")["input_ids"],
        tokenizer("11")["input_ids"],
        [],
        tokenizer("5<|im_end|>")["input_ids"],
    ]
    completions = [[{"role": "assistant", "content": tokenizer.decode(c)}] for c in completion_ids]
    logged = {}
    rewards = reward_fn(
        prompts=prompts,
        completions=completions,
        completion_ids=completion_ids,
        answer=["2", "2", "5", "5"],
        trainer_state=None,
        log_metric=lambda name, value: logged.setdefault(name, value),
    )
    assert (
        len(rewards) == 4 and rewards[2] is None and all(isinstance(r, float) for i, r in enumerate(rewards) if i != 2)
    )
    assert set(logged) == {"sar/ppl_cond", "sar/ppl_uncond"}
    # Same numbers as tokenizing by hand the way TRL does, with the system message kept in the placeholder.
    prompt_ids = [
        tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=True, return_dict=False) for p in prompts
    ]
    placeholders = [build_placeholder_ids(tokenizer), build_placeholder_ids(tokenizer)] + [
        build_placeholder_ids(tokenizer, system_message="be brief")
    ] * 2
    for i in (0, 1, 3):
        cond = naive_perplexity(model, prompt_ids[i], completion_ids[i])
        uncond = naive_perplexity(model, placeholders[i], completion_ids[i])
        tol = tolerance(model, [prompt_ids[i]], [completion_ids[i]], placeholder=placeholders[i])
        expected = sar_reward(torch.tensor(cond, dtype=torch.float64), torch.tensor(uncond, dtype=torch.float64))
        assert_reward_close(torch.tensor(rewards[i]), expected, tol)


def test_self_aligned_reward_with_text_prompts_and_prompt_ids():
    model = tiny_model("llama")
    tokenizer = plain_tokenizer()  # plain-text prompts: its BOS is the plain-text placeholder
    reward_fn = SelfAlignedReward(model, tokenizer, max_tokens_per_pass=16)
    completion_ids = [[40, 41, 42], [43]]
    text = reward_fn(prompts=["what is 1+1?", "what is 1+1?"], completions=["a", "b"], completion_ids=completion_ids)
    ids = tokenizer("what is 1+1?")["input_ids"]
    given = reward_fn(prompts=["x", "y"], completions=["a", "b"], completion_ids=completion_ids, prompt_ids=[ids, ids])
    tol = tolerance(model, [ids], completion_ids, placeholder=reward_fn.scorer.placeholder_ids)
    assert_reward_close(torch.tensor(text), torch.tensor(given, dtype=torch.float64), 2 * tol)


def fake_flash_attn_varlen_func(
    q,
    k,
    v,
    cu_q,
    cu_k,
    max_q,
    max_k,
    dropout_p=0.0,
    softmax_scale=None,
    causal=False,
    window_size=(-1, -1),
    softcap=0.0,
):
    """flash-attn's documented varlen semantics, written out densely: per sequence, causal aligned bottom-right
    (query r may see key c <= r + len_k - len_q), window (left, right) around that diagonal, GQA by head groups,
    scores soft-capped (``softcap * tanh(score / softcap)``) when ``softcap > 0``."""
    assert causal and dropout_p == 0.0 and k.shape[0] == cu_k[-1] and q.shape[0] == cu_q[-1]
    rep = q.shape[1] // k.shape[1]
    out = torch.empty_like(q)
    for i in range(len(cu_q) - 1):
        qs, qe, ks, ke = int(cu_q[i]), int(cu_q[i + 1]), int(cu_k[i]), int(cu_k[i + 1])
        assert qe - qs <= max_q and ke - ks <= max_k
        qi = q[qs:qe].transpose(0, 1)
        ki, vi = k[ks:ke].repeat_interleave(rep, 1).transpose(0, 1), v[ks:ke].repeat_interleave(rep, 1).transpose(0, 1)
        diag = torch.arange(qe - qs).unsqueeze(1) + (ke - ks) - (qe - qs)
        col = torch.arange(ke - ks).unsqueeze(0)
        allowed = col <= diag
        if window_size[0] >= 0:
            allowed &= col >= diag - window_size[0]
        scores = (qi @ ki.transpose(-1, -2)) * softmax_scale
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        out[qs:qe] = (scores.masked_fill(~allowed, float("-inf")).softmax(-1) @ vi).transpose(0, 1)
    return out


@pytest.mark.parametrize("window, softcap", [(None, None), (3, None), (3, 1.5)])
def test_flash_varlen_path_with_a_stand_in_kernel(window, softcap, monkeypatch):
    """The flash path's gathered keys, cu_seqlens and window mapping, on CPU with a dense stand-in for the kernel."""
    import sys
    import types

    monkeypatch.setitem(
        sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_varlen_func=fake_flash_attn_varlen_func)
    )
    monkeypatch.setattr(attention, "_choose_backend", lambda layout, query: "flash")
    g = torch.Generator().manual_seed(1)
    segments = (
        AttentionSegment(0, 5),
        AttentionSegment(5, 7, 0, 5),
        AttentionSegment(12, 0, 0, 5),
        AttentionSegment(12, 3, 0, 5),
        AttentionSegment(15, 1),
        AttentionSegment(16, 4, 15, 1),
    )
    layout = PackedLayout(segments, total_len=20, backend="flash")
    q = torch.randn(1, 4, 20, 8, generator=g)
    k, v = torch.randn(1, 2, 20, 8, generator=g), torch.randn(1, 2, 20, 8, generator=g)
    q, k = 2 * q, 2 * k  # scores of several units: a cap of 1.5 changes them a lot
    out, _ = shared_prefix_attention(
        torch.nn.Module(), q, k, v, None, scaling=0.4, sliding_window=window, softcap=softcap, sarkern_layout=layout
    )
    assert_attention_close(out, q, k, v, layout, 0.4, window, softcap=softcap)

    # And through a whole model.
    model = tiny_model("mistral")
    prompts, completions = mixed_batch(seed=10)
    scores = SARScorer(model, placeholder_ids=PLACEHOLDER).score(prompts, completions)
    expected = [naive_perplexity(model, p, c) for p, c in zip(prompts, completions)]
    assert_ppl_close(scores.ppl_cond, expected, tolerance(model, prompts, completions))
