"""Property tests: random shapes, temperatures and masks, every backend within DESIGN.md's tolerances."""

import contextlib
import warnings

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from op_helpers import BACKENDS, DEVICE, fp32_logprob_atol

import sarkern
from sarkern import reference

SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("SARKERN_BACKEND", request.param)
    return request.param


@st.composite
def problems(draw):
    n = draw(st.integers(1, 40))
    dim = draw(st.integers(1, 40))
    vocab = draw(st.integers(1, 200))
    temperature = draw(st.sampled_from([1.0, 0.5, 2.0, draw(st.floats(0.2, 3.0))]))
    ignore_fraction = draw(st.sampled_from([0.0, 0.3, 1.0]))
    seed = draw(st.integers(0, 2**31 - 1))
    return n, dim, vocab, temperature, ignore_fraction, seed


@SETTINGS
@given(problem=problems(), with_bias=st.booleans())
def test_linear_token_logprobs_property(backend, problem, with_bias):
    n, dim, vocab, temperature, ignore_fraction, seed = problem
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, dim, generator=g).to(DEVICE)
    weight = (torch.randn(vocab, dim, generator=g) * 2 / dim**0.5).to(DEVICE)
    bias = torch.randn(vocab, generator=g).to(DEVICE) if with_bias else None
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignore_fraction] = -100
    targets = targets.to(DEVICE)
    out, ent = sarkern.linear_token_logprobs(
        hidden, weight, targets, bias=bias, temperature=temperature, return_entropy=True
    )
    ref, ref_ent = reference.linear_token_logprobs(
        hidden.double(),
        weight.double(),
        targets,
        bias=None if bias is None else bias.double(),
        temperature=temperature,
        return_entropy=True,
    )
    abs_terms = hidden.double().abs() @ weight.double().abs().T
    if bias is not None:
        abs_terms = abs_terms + bias.double().abs()
    atol = fp32_logprob_atol(abs_terms, dim + 1, temperature)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=0)
    torch.testing.assert_close(ent.double(), ref_ent, atol=atol, rtol=0)
    assert (out[targets == -100] == 0).all()
    assert (out <= 1e-6).all()


@SETTINGS
@given(problem=problems())
def test_token_logprobs_property(backend, problem):
    n, _, vocab, temperature, ignore_fraction, seed = problem
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(n, vocab, generator=g) * 5).to(DEVICE)
    targets = torch.randint(0, vocab, (n,), generator=g)
    targets[torch.rand(n, generator=g) < ignore_fraction] = -100
    targets = targets.to(DEVICE)
    logits.requires_grad_(True)
    out, ent = sarkern.token_logprobs(logits, targets, temperature=temperature, return_entropy=True)
    ref, ref_ent = reference.token_logprobs(
        logits.detach().double(), targets, temperature=temperature, return_entropy=True
    )
    atol = fp32_logprob_atol(logits.detach(), 0, temperature)
    torch.testing.assert_close(out.double(), ref, atol=atol, rtol=0)
    torch.testing.assert_close(ent.double(), ref_ent, atol=atol, rtol=0)
    # Gradient rows of a softmax sum to zero (the one-hot and the probabilities both sum to one); the entries
    # are divided by T, and so is the rounding of their sum.
    out.sum().backward()
    atol = 2e-5 / min(temperature, 1.0)
    torch.testing.assert_close(logits.grad.sum(-1), torch.zeros(n, device=DEVICE), atol=atol, rtol=0)


@SETTINGS
@given(problem=problems(), num_segments=st.integers(1, 6))
def test_sequence_perplexity_property(backend, problem, num_segments):
    n, dim, vocab, temperature, _, seed = problem
    num_segments = min(num_segments, n)  # the op refuses more segments than tokens
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, dim, generator=g).to(DEVICE)
    weight = (torch.randn(vocab, dim, generator=g) / dim**0.5).to(DEVICE)
    targets = torch.randint(0, vocab, (n,), generator=g).to(DEVICE)
    segments = torch.randint(-1, num_segments, (n,), generator=g).to(DEVICE)
    with _maybe_warns(segments, num_segments):
        ppl = sarkern.sequence_perplexity(hidden, weight, targets, segments, num_segments, temperature=temperature)
    ref = reference.sequence_perplexity(
        hidden.double(), weight.double(), targets, segments, num_segments, temperature=temperature
    )
    torch.testing.assert_close(ppl.double(), ref, rtol=1e-5, atol=0, equal_nan=True)
    assert (ppl[~torch.isnan(ppl)] >= 1 - 1e-6).all()


def _maybe_warns(segments, num_segments):
    """Empty segments must be reported; full ones must not be."""
    empty = num_segments - len(set(segments[segments >= 0].tolist()))
    if empty:
        return pytest.warns(RuntimeWarning, match=f"{empty} of {num_segments} segments have no tokens")
    return _no_empty_segment_warning()


@contextlib.contextmanager
def _no_empty_segment_warning():
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*segments have no tokens")
        yield
