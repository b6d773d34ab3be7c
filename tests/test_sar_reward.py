"""sar_reward: every variant against the reference implementation's formula, stability, and edge cases."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from sarkern.sar import SELF_CONFIDENCE_OFFSET, sar_reward, sar_reward_from_nll


def reference_formula(
    ppl_qa: float, ppl_a: float, *, use_log=False, use_denominator=True, use_comparison=True, clip_value=-1.0
) -> float:
    """The authors' per-sample formula (compute_ppl_qa_log), in float64 Python arithmetic."""
    qa, a = (math.log(ppl_qa), math.log(ppl_a)) if use_log else (ppl_qa, ppl_a)
    if clip_value > 1:
        qa, a = min(qa, clip_value), min(a, clip_value)
    if not use_comparison:
        return -qa + 5
    if use_denominator:
        return max((a - qa) / (a + 1e-9), -1)
    return a - qa


VARIANTS = [
    {},
    {"use_log": True},
    {"clip_value": 3.0},
    {"use_log": True, "clip_value": 2.5},
    {"use_denominator": False},
    {"use_denominator": False, "use_log": True},
    {"use_denominator": False, "clip_value": 4.0},
    {"use_comparison": False, "use_denominator": False},
    {"use_comparison": False, "use_denominator": False, "use_log": True},
    {"use_comparison": False, "use_denominator": False, "clip_value": 2.0},
    {"clip_value": 1.0},  # <= 1 disables clipping
]


@pytest.mark.parametrize("options", VARIANTS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "default")
def test_variants_match_the_reference_formula(options):
    g = torch.Generator().manual_seed(0)
    ppl_c = torch.exp(torch.rand(200, generator=g, dtype=torch.float64) * 3)  # 1 .. 20
    ppl_u = torch.exp(torch.rand(200, generator=g, dtype=torch.float64) * 3)
    expected = torch.tensor(
        [reference_formula(c, u, **options) for c, u in zip(ppl_c.tolist(), ppl_u.tolist())], dtype=torch.float64
    )
    got64 = sar_reward(ppl_c, ppl_u, **options)
    assert got64.dtype == torch.float64
    torch.testing.assert_close(got64, expected, rtol=1e-9, atol=1e-8)
    got32 = sar_reward(ppl_c.float(), ppl_u.float(), **options)
    assert got32.dtype == torch.float32 and got32.shape == (200,)
    torch.testing.assert_close(got32.double(), expected, rtol=1e-5, atol=2e-6)


def test_from_nll_equals_from_perplexity():
    nll_c, nll_u = torch.tensor([0.1, 2.0, 5.0]), torch.tensor([0.3, 1.0, 5.0])
    for options in VARIANTS:
        torch.testing.assert_close(
            sar_reward_from_nll(nll_c, nll_u, **options), sar_reward(nll_c.exp(), nll_u.exp(), **options)
        )


def test_default_is_stable_for_huge_and_close_perplexities():
    # log-perplexities of 80 (ppl ~ 5.5e34): (A - QA) / A computed naively in fp32 is dominated by rounding.
    nll_u = torch.tensor([80.0, 80.0, 30.0], dtype=torch.float32)
    delta = torch.tensor([1e-4, -2e-5, 3e-6], dtype=torch.float32)
    got = sar_reward_from_nll(nll_u + delta, nll_u)
    exact = [-math.expm1(float(c) - float(u)) for c, u in zip((nll_u + delta).tolist(), nll_u.tolist())]
    torch.testing.assert_close(got.double(), torch.tensor(exact, dtype=torch.float64), rtol=1e-6, atol=0)
    # The unnormalised variant too: A - QA = A * (1 - QA / A), not a difference of two rounded large numbers.
    nll_u, nll_c = torch.tensor([20.0]), torch.tensor([20.0 - 1e-5])
    exact = math.exp(float(nll_u)) - math.exp(float(nll_c))
    got = sar_reward_from_nll(nll_c, nll_u, use_denominator=False)
    assert got.item() == pytest.approx(exact, rel=1e-5)
    naive = (nll_u.exp() - nll_c.exp()).item()  # what subtracting fp32 perplexities gives
    assert abs(naive / exact - 1) > 1e-3


def test_bounds_limits_and_nan():
    got = sar_reward_from_nll(
        torch.tensor([math.inf, 0.0, math.nan, 1.0, math.inf]), torch.tensor([1.0, math.inf, 1.0, math.nan, math.inf])
    )
    assert got[0] == -1.0 and got[1] == 1.0
    assert torch.isnan(got[2:]).all()


@settings(max_examples=300, deadline=None)
@given(st.floats(0, 50), st.floats(0, 50))
def test_default_lies_in_minus_one_one_and_is_monotone(nll_c, nll_u):
    r = float(sar_reward_from_nll(torch.tensor(nll_c), torch.tensor(nll_u)))
    assert -1.0 <= r <= 1.0
    assert (r > 0) == (nll_c < nll_u) or abs(nll_c - nll_u) < 1e-6
    worse = float(sar_reward_from_nll(torch.tensor(nll_c + 0.5), torch.tensor(nll_u)))
    assert worse <= r


@settings(max_examples=200, deadline=None)
@given(st.floats(1.0, 1e6), st.floats(1.0, 1e6), st.sampled_from(VARIANTS))
def test_property_against_reference_formula(ppl_c, ppl_u, options):
    got = float(
        sar_reward(torch.tensor(ppl_c, dtype=torch.float64), torch.tensor(ppl_u, dtype=torch.float64), **options)
    )
    expected = reference_formula(ppl_c, ppl_u, **options)
    assert got == pytest.approx(expected, rel=1e-9, abs=1e-6 * max(1.0, abs(ppl_u), abs(ppl_c)) * 1e-3)


def test_self_confidence_needs_no_unconditioned_term():
    got = sar_reward(torch.tensor([2.0, 3.0]), None, use_comparison=False, use_denominator=False)
    torch.testing.assert_close(got, SELF_CONFIDENCE_OFFSET - torch.tensor([2.0, 3.0]))


def test_bad_options_and_inputs():
    with pytest.raises(ValueError, match="use_denominator=False"):
        sar_reward(torch.tensor([2.0]), torch.tensor([3.0]), use_comparison=False)
    with pytest.raises(ValueError, match="nll_uncond is required"):
        sar_reward_from_nll(torch.tensor([2.0]), None)
    with pytest.raises(ValueError, match="ppl_cond must be positive"):
        sar_reward(torch.tensor([0.0]), torch.tensor([3.0]))
    with pytest.raises(ValueError, match="ppl_uncond must be positive"):
        sar_reward(torch.tensor([2.0]), torch.tensor([-3.0]))
    with pytest.raises(ValueError, match="clip_value"):
        sar_reward(torch.tensor([2.0]), torch.tensor([3.0]), clip_value=math.nan)
    with pytest.raises(TypeError, match="real numbers"):
        sar_reward(torch.tensor([True]), torch.tensor([3.0]))


def test_accepts_python_numbers_and_broadcasts():
    assert float(sar_reward(2.0, 4.0)) == pytest.approx(0.5)
    got = sar_reward([2.0, 4.0, 8.0], 4.0)
    torch.testing.assert_close(got, torch.tensor([0.5, 0.0, -1.0]))


# ---------------------------------------------------------------- issue 24: tokens after a completion's first EOS


def _scorer_setup():
    from scorer_models import chat_tokenizer, random_ids, tiny_model

    model, tokenizer = tiny_model("llama"), chat_tokenizer()
    eos = tokenizer.eos_token_id
    generator = torch.Generator().manual_seed(3)
    prompt = [4, *random_ids(generator, 6)]
    answer = [i for i in random_ids(generator, 5) if i != eos] + [eos]  # ends at its EOS
    after = random_ids(generator, 4)  # what a caller might leave after it: more text, or pads with pad == eos
    return model, tokenizer, prompt, answer, after


def test_score_cuts_each_completion_after_its_first_eos():
    from sarkern.scorer import SARScorer

    model, tokenizer, prompt, answer, after = _scorer_setup()
    eos = tokenizer.eos_token_id
    scorer = SARScorer(model, tokenizer)
    # TRL's: the generation config's EOS ids (Llama's config default, 2) and the tokenizer's.
    assert sorted(scorer.eos_token_ids) == sorted({model.generation_config.eos_token_id, eos}) == [2, eos]
    reference = scorer.score([prompt], [answer])
    for extra in (after, [eos] * 3):  # text after the EOS, or right padding with pad == eos and no mask
        cut = scorer.score([prompt], [answer + extra])
        assert cut.num_tokens.tolist() == [len(answer)]
        assert torch.equal(cut.reward, reference.reward) and torch.equal(cut.ppl_uncond, reference.ppl_uncond)
    # A padded 2-D batch whose mask covers tokens after the EOS (pad == eos): the mask first, then the cut.
    ids = torch.tensor([answer + after + [0, 0], answer + [eos] * 6])
    mask = torch.tensor([[1] * (len(answer) + len(after)) + [0, 0], [1] * (len(answer) + 6)])
    batch = scorer.score([prompt, prompt], ids, completion_mask=mask)
    assert batch.num_tokens.tolist() == [len(answer)] * 2
    assert torch.allclose(batch.reward, reference.reward.expand(2), rtol=0, atol=1e-6)
    # Caller's conditioned log-probs, one per token as given: the cut ones are left out of the mean.
    logprobs = torch.tensor([-0.5] * len(answer) + [-9.0] * len(after))
    given = scorer.score([prompt], [answer + after], cond_logprobs=[logprobs])
    assert given.ppl_cond.item() == pytest.approx(math.exp(0.5), rel=1e-6)
    # Without an EOS the completion is scored whole (a completion truncated at the length limit).
    assert scorer.score([prompt], [answer[:-1] + after]).num_tokens.tolist() == [len(answer) - 1 + len(after)]


def test_score_refuses_tokens_after_the_first_eos_when_asked():
    from sarkern.scorer import SARScorer

    model, tokenizer, prompt, answer, after = _scorer_setup()
    scorer = SARScorer(model, tokenizer, tokens_after_eos="raise")
    scorer.score([prompt], [answer])  # ending at the EOS is fine
    with pytest.raises(ValueError, match=rf"completion_ids\[1\] has {len(after)} tokens after its first EOS"):
        scorer.score([prompt, prompt], [answer, answer + after])
    with pytest.raises(ValueError, match="tokens_after_eos must be 'cut' or 'raise'"):
        SARScorer(model, tokenizer, tokens_after_eos="keep")
    # eos_token_ids=(): no EOS known, every completion scored whole, as given.
    whole = SARScorer(model, tokenizer, eos_token_ids=())
    assert whole.score([prompt], [answer + after]).num_tokens.tolist() == [len(answer) + len(after)]
    with pytest.raises(ValueError, match="eos_token_ids holds token id 999"):
        SARScorer(model, tokenizer, eos_token_ids=[999]).score([prompt], [answer])


def test_self_aligned_reward_cuts_after_the_first_eos_too():
    from sarkern.scorer import SelfAlignedReward

    model, tokenizer, _, answer, after = _scorer_setup()
    prompts = [[{"role": "user", "content": "2+2?"}]] * 2
    reward = SelfAlignedReward(model, tokenizer)
    got = reward(prompts=prompts, completions=["x", "x"], completion_ids=[answer, answer + after])
    assert got[0] == got[1]
    strict = SelfAlignedReward(model, tokenizer, tokens_after_eos="raise")
    with pytest.raises(ValueError, match="tokens after its first EOS"):
        strict(prompts=prompts, completions=["x", "x"], completion_ids=[answer, answer + after])
