"""Hostile or careless inputs to the ops (issue 15, items 8-12 and the op messages of 16): never a silently wrong
number, never a deep crash. Every backend, the Triton kernels under the interpreter on CPU."""

import numpy as np
import pytest
import torch
from op_helpers import BACKENDS, DEVICE

import sarkern
from sarkern import reference


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("SARKERN_BACKEND", request.param)
    return request.param


def _lin(n, d, v, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g).to(DEVICE), torch.randn(v, d, generator=g).to(DEVICE)


# ---------------------------------------------------------------------------------- 8, 11: narrow target dtypes


def test_uint8_target_156_is_a_token_not_the_ignore_index(backend):
    """-100 wraps to 156 in uint8: the id must still count (a uint8 tensor cannot hold -100 at all)."""
    h, w = _lin(6, 8, 200)
    wide = torch.tensor([5, 156, 199, 0, 156, 17], device=DEVICE)
    narrow = wide.to(torch.uint8)
    expected = reference.linear_token_logprobs(h.double(), w.double(), wide)
    assert (expected != 0).all()
    got = sarkern.linear_token_logprobs(h, w, narrow)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)
    got = sarkern.token_logprobs(h @ w.T, narrow)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)
    segments = torch.tensor([0, 0, 0, 1, 1, 1], dtype=torch.uint8, device=DEVICE)
    ppl = sarkern.sequence_perplexity(h, w, narrow, segments, 2)
    ref = reference.sequence_perplexity(h.double(), w.double(), wide, segments.long(), 2)
    torch.testing.assert_close(ppl.double(), ref, rtol=1e-5, atol=0)


def test_int16_targets_in_a_large_vocabulary_are_accepted(backend):
    """An int16 id 25000 is below V = 40000; comparing in int16 wrapped V around and refused it."""
    vocab = 40000
    logits = torch.randn(3, vocab, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    wide = torch.tensor([25000, 32767, -100], device=DEVICE)
    got = sarkern.token_logprobs(logits, wide.to(torch.int16))
    expected = reference.token_logprobs(logits.double(), wide)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)
    assert got[2] == 0 and got[0] != 0


def test_ignore_index_outside_the_target_dtype_range(backend):
    """ignore_index=156 cannot be held by int8 targets: an int8 -100 is then a bad id on every backend (the torch
    path used to wrap 156 to -100 and ignore it, the Triton one returned a finite log-prob)."""
    h, w = _lin(3, 8, 11)
    targets = torch.tensor([1, -100, 2], dtype=torch.int8, device=DEVICE)
    with pytest.raises(ValueError, match=r"targets must be in \[0, 11\) or equal ignore_index=156; found -100"):
        sarkern.linear_token_logprobs(h, w, targets, ignore_index=156)
    with pytest.raises(ValueError, match=r"found -100"):
        sarkern.token_logprobs(h @ w.T, targets, ignore_index=156)
    # uint8 targets and ignore_index -100: nothing is ignored, the two backends agree with the reference.
    targets = torch.tensor([1, 2, 10], dtype=torch.uint8, device=DEVICE)
    got = sarkern.linear_token_logprobs(h, w, targets, ignore_index=-100)
    torch.testing.assert_close(
        got.double(), reference.linear_token_logprobs(h.double(), w.double(), targets.long()), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("bad", [2**70, True, 1.5])
def test_ignore_index_that_is_not_an_int64(backend, bad):
    h, w = _lin(3, 8, 11)
    targets = torch.tensor([1, 2, 3], device=DEVICE)
    with pytest.raises((TypeError, ValueError), match="ignore_index must"):
        sarkern.linear_token_logprobs(h, w, targets, ignore_index=bad)
    with pytest.raises((TypeError, ValueError), match="ignore_index must"):
        sarkern.token_logprobs(h @ w.T, targets, ignore_index=bad)


# ----------------------------------------------------------------------------------------------- 9: NaN inputs


def test_nan_logit_gives_nan_logprob_and_nan_entropy(backend):
    """A NaN logit must never read as a certain (entropy 0) prediction."""
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    logits[1, 7] = float("nan")  # not the target
    targets = torch.tensor([3, 4, 5], device=DEVICE)
    logprobs, entropy = sarkern.token_logprobs(logits, targets, return_entropy=True)
    assert torch.isnan(logprobs[1]) and torch.isnan(entropy[1])
    assert torch.isfinite(logprobs[[0, 2]]).all() and torch.isfinite(entropy[[0, 2]]).all()


def test_nan_in_the_lm_head_or_hidden_gives_nan_everywhere_it_reaches(backend):
    h, w = _lin(5, 8, 70)
    targets = torch.tensor([1, 2, 3, 4, -100], device=DEVICE)
    bad_head = w.clone()
    bad_head[33, 2] = float("nan")  # a NaN row in the LM head: every token's softmax sees it
    logprobs, entropy = sarkern.linear_token_logprobs(h, bad_head, targets, return_entropy=True)
    assert torch.isnan(logprobs[:4]).all() and torch.isnan(entropy[:4]).all()
    assert logprobs[4] == 0 and entropy[4] == 0  # ignored positions stay 0
    bad_hidden = h.clone()
    bad_hidden[2, 0] = float("nan")
    logprobs, entropy = sarkern.linear_token_logprobs(bad_hidden, w, targets, return_entropy=True)
    assert torch.isnan(logprobs[2]) and torch.isnan(entropy[2])
    assert torch.isfinite(logprobs[[0, 1, 3]]).all() and torch.isfinite(entropy[[0, 1, 3]]).all()
    segments = torch.tensor([0, 0, 1, 1, 2], device=DEVICE)
    ppl = sarkern.sequence_perplexity(bad_hidden, w, targets.clamp(min=0), segments, 3)
    assert torch.isfinite(ppl[0]) and torch.isnan(ppl[1]) and torch.isfinite(ppl[2])


# ------------------------------------------------------------------------------------------ 10: tiny temperatures


@pytest.mark.parametrize("temperature", [1e-40, 1e-39, 1e39])
def test_temperatures_that_overflow_float32_are_refused(backend, temperature):
    h, w = _lin(3, 8, 11)
    targets = torch.tensor([1, 2, 3], device=DEVICE)
    with pytest.raises(ValueError, match="temperature .* float32"):
        sarkern.linear_token_logprobs(h, w, targets, temperature=temperature)
    with pytest.raises(ValueError, match="temperature .* float32"):
        sarkern.token_logprobs(h @ w.T, targets, temperature=temperature)


def test_smallest_accepted_temperature_gives_finite_results(backend):
    h, w = _lin(3, 8, 11)
    targets = torch.tensor([1, 2, 3], device=DEVICE)
    small = torch.finfo(torch.float32).tiny
    out = sarkern.token_logprobs((h @ w.T) * 1e-30, targets, temperature=small)
    assert torch.isfinite(out).all()
    # numpy scalars are real numbers too
    got = sarkern.token_logprobs(h @ w.T, targets, temperature=np.float32(0.7))
    expected = reference.token_logprobs((h @ w.T).double(), targets, temperature=float(np.float32(0.7)))
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)


# -------------------------------------------------------------------------------------------- 12: num_segments


def test_num_segments_beyond_the_tokens_is_refused_before_allocating(backend):
    h, w = _lin(4, 8, 11)
    targets = torch.tensor([1, 2, 3, 4], device=DEVICE)
    segments = torch.tensor([0, 0, 1, 1], device=DEVICE)
    for huge in (10**8, 10**9, 5):
        with pytest.raises(ValueError, match=f"num_segments={huge} exceeds the 4 tokens"):
            sarkern.sequence_perplexity(h, w, targets, segments, huge)
    ppl = sarkern.sequence_perplexity(h, w, targets, segments, np.int64(2))  # numpy ints are ints
    assert ppl.shape == (2,) and torch.isfinite(ppl).all()
    with pytest.warns(RuntimeWarning, match="2 of 4 segments have no tokens"):
        assert sarkern.sequence_perplexity(h, w, targets, segments, 4).isnan().sum() == 2


# ------------------------------------------------------------------------------------------- 16: op messages


def test_empty_hidden_dimension_is_named(backend):
    h, w = torch.empty(5, 0, device=DEVICE), torch.empty(11, 0, device=DEVICE)
    targets = torch.zeros(5, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match=r"empty hidden dimension \(D = 0\)"):
        sarkern.linear_token_logprobs(h, w, targets)
    with pytest.raises(ValueError, match=r"empty hidden dimension \(D = 0\)"):
        sarkern.sequence_perplexity(h, w, targets, targets, 1)
