"""`softcap` (final-logit soft-capping) and `check_inputs=False` on every op and backend.

Soft-capping is checked against the float64 reference with gradients. The kernels build tanh from `exp`, whose
absolute error is a few units of fp32 rounding of the capped value (`cap * tanh` is at most `cap`): 4 u cap on
each capped logit, which moves a log-prob or an entropy by at most twice that after the division by T, on top of
the uncapped bound of `fp32_logprob_atol` (through the cap's slope, which is at most 1).
"""

import pytest
import torch
from op_helpers import (
    BACKENDS,
    DEVICE,
    FP32_UNIT_ROUNDOFF,
    LOGPROB_ATOL,
    assert_grad_close,
    fp32_logprob_atol,
    lowp,
    random_targets,
)

import sarkern
from sarkern import ops, reference


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("SARKERN_BACKEND", request.param)
    return request.param


def _capped_atol(dtype, abs_terms, n_terms, softcap, temperature):
    if dtype != torch.float32:
        return LOGPROB_ATOL[dtype]
    tanh_error = 2 * 4 * FP32_UNIT_ROUNDOFF * softcap / temperature
    return fp32_logprob_atol(abs_terms, n_terms, temperature) + tanh_error


def _backward_pair(outputs, ref_outputs, seed):
    g = torch.Generator().manual_seed(seed)
    loss, ref_loss = 0.0, 0.0
    for out, ref in zip(outputs, ref_outputs):
        weights = torch.randn(out.shape, generator=g, dtype=torch.float64).to(DEVICE)
        loss = loss + (out * weights).sum()
        ref_loss = ref_loss + (ref * weights).sum()
    loss.backward()
    ref_loss.backward()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("softcap,temperature", [(5.0, 1.0), (30.0, 0.7), (0.5, 1.3)])
def test_token_logprobs_softcap(backend, dtype, softcap, temperature):
    """Logits spread well past the cap, so both the linear and the saturated parts of tanh are exercised."""
    torch.manual_seed(int(softcap * 10))
    logits, logits_ref = lowp(torch.randn(3, 5, 203, dtype=torch.float64) * 2 * softcap, dtype)
    targets = random_targets((3, 5), 203)
    logits.requires_grad_(True)
    logits_ref.requires_grad_(True)
    options = dict(temperature=temperature, return_entropy=True, softcap=softcap)
    out = sarkern.token_logprobs(logits, targets, **options)
    ref = reference.token_logprobs(logits_ref, targets, **options)
    atol = _capped_atol(dtype, logits_ref.detach(), 0, softcap, temperature)
    for name, actual, expected in zip(("log-probs", "entropy"), out, ref):
        torch.testing.assert_close(
            actual.double(), expected, atol=atol, rtol=0, msg=lambda m, name=name: f"{name}: {m}"
        )
    _backward_pair(out, ref, seed=1)
    assert_grad_close(logits.grad, logits_ref.grad, dtype, "grad logits")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1, 16, 40), (70, 20, 101), (37, 33, 257)], ids=lambda s: "x".join(map(str, s)))
def test_linear_token_logprobs_softcap(backend, dtype, shape):
    n, dim, vocab = shape
    softcap, temperature = 4.0, 0.8
    g = torch.Generator().manual_seed(n)
    h, h_ref = lowp(torch.randn(n, dim, generator=g, dtype=torch.float64), dtype)
    w, w_ref = lowp(torch.randn(vocab, dim, generator=g, dtype=torch.float64) * 8 / dim**0.5, dtype)
    b, b_ref = lowp(torch.randn(vocab, generator=g, dtype=torch.float64), dtype)
    targets = random_targets((n,), vocab, generator=g)
    leaves, ref_leaves = (h, w, b), (h_ref, w_ref, b_ref)
    for t in leaves + ref_leaves:
        t.requires_grad_(True)
    options = dict(bias=None, temperature=temperature, return_entropy=True, softcap=softcap)
    out = sarkern.linear_token_logprobs(h, w, targets, **{**options, "bias": b})
    ref = reference.linear_token_logprobs(h_ref, w_ref, targets, **{**options, "bias": b_ref})
    abs_terms = h_ref.detach().abs() @ w_ref.detach().abs().T + b_ref.detach().abs()
    atol = _capped_atol(dtype, abs_terms, dim, softcap, temperature)
    for name, actual, expected in zip(("log-probs", "entropy"), out, ref):
        torch.testing.assert_close(
            actual.double(), expected, atol=atol, rtol=0, msg=lambda m, name=name: f"{name}: {m}"
        )
    _backward_pair(out, ref, seed=2)
    for name, leaf, ref_leaf in zip(("hidden", "weight", "bias"), leaves, ref_leaves):
        assert_grad_close(leaf.grad, ref_leaf.grad, dtype, f"grad {name}")


def test_sequence_perplexity_softcap(backend):
    g = torch.Generator().manual_seed(5)
    n, dim, vocab, softcap = 61, 24, 150, 3.0
    h, h_ref = lowp(torch.randn(n, dim, generator=g, dtype=torch.float64), torch.float32)
    w, w_ref = lowp(torch.randn(vocab, dim, generator=g, dtype=torch.float64) * 6 / dim**0.5, torch.float32)
    targets = torch.randint(0, vocab, (n,), generator=g).to(DEVICE)
    segments = torch.randint(-1, 5, (n,), generator=g).to(DEVICE)
    for t in (h, w, h_ref, w_ref):
        t.requires_grad_(True)
    ppl = sarkern.sequence_perplexity(h, w, targets, segments, 5, softcap=softcap)
    ref = reference.sequence_perplexity(h_ref, w_ref, targets, segments, 5, softcap=softcap)
    # Compared as mean NLL (log ppl): each token's log-prob is within the per-token bound, so is their mean.
    abs_terms = h_ref.detach().abs() @ w_ref.detach().abs().T
    atol = _capped_atol(torch.float32, abs_terms, dim, softcap, 1.0)
    torch.testing.assert_close(ppl.log().double(), ref.log(), atol=atol, rtol=0)
    assert not torch.allclose(ppl.double(), reference.sequence_perplexity(h_ref, w_ref, targets, segments, 5))
    _backward_pair((ppl.log(),), (ref.log(),), seed=3)
    assert_grad_close(h.grad, h_ref.grad, torch.float32, "grad hidden")
    assert_grad_close(w.grad, w_ref.grad, torch.float32, "grad weight")


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan"), True, "3"])
def test_bad_softcap_is_refused(bad):
    logits = torch.randn(2, 9)
    targets = torch.tensor([1, 2])
    with pytest.raises((ValueError, TypeError), match="softcap"):
        sarkern.token_logprobs(logits, targets, softcap=bad)
    with pytest.raises((ValueError, TypeError), match="softcap"):
        sarkern.linear_token_logprobs(torch.randn(2, 4), torch.randn(9, 4), targets, softcap=bad)


# ----------------------------------------------------------------------------------------- check_inputs=False


def _refuse_host_checks(monkeypatch):
    """Make every run-time id check fail loudly: with `check_inputs=False` none of them may run."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a run-time id check ran although check_inputs=False")

    monkeypatch.setattr(ops, "_check_targets_in_vocab", forbidden)


def test_unchecked_ops_skip_the_id_checks_and_agree(backend, monkeypatch):
    g = torch.Generator().manual_seed(7)
    n, dim, vocab = 45, 16, 77
    hidden = torch.randn(n, dim, generator=g).to(DEVICE)
    weight = (torch.randn(vocab, dim, generator=g) / 2).to(DEVICE)
    targets = random_targets((n,), vocab, generator=g)
    segments = torch.randint(-1, 4, (n,), generator=g).to(DEVICE)
    checked = (
        sarkern.token_logprobs(hidden @ weight.T, targets, return_entropy=True),
        sarkern.linear_token_logprobs(hidden, weight, targets, return_entropy=True),
        sarkern.sequence_perplexity(hidden, weight, targets.clamp(min=0), segments, 4),
    )
    _refuse_host_checks(monkeypatch)
    unchecked = (
        sarkern.token_logprobs(hidden @ weight.T, targets, return_entropy=True, check_inputs=False),
        sarkern.linear_token_logprobs(hidden, weight, targets, return_entropy=True, check_inputs=False),
        sarkern.sequence_perplexity(hidden, weight, targets.clamp(min=0), segments, 4, check_inputs=False),
    )
    # Same code path apart from the checks: identical numbers.
    for a, b in zip(checked, unchecked):
        for x, y in zip(a if isinstance(a, tuple) else (a,), b if isinstance(b, tuple) else (b,)):
            torch.testing.assert_close(x, y, rtol=0, atol=0)


def test_unchecked_bad_ids_give_nan_never_a_wrong_number_or_a_crash(backend):
    """Ids the caller vouched for but got wrong: a target outside the vocabulary gives NaN (not a plausible
    log-prob), and a segment id past the last segment is dropped rather than written out of bounds."""
    g = torch.Generator().manual_seed(8)
    n, dim, vocab = 12, 8, 30
    hidden = torch.randn(n, dim, generator=g).to(DEVICE)
    weight = torch.randn(vocab, dim, generator=g).to(DEVICE)
    targets = torch.randint(0, vocab, (n,), generator=g).to(DEVICE)
    targets[3], targets[5] = vocab + 4, -7
    for out in (
        sarkern.token_logprobs(hidden @ weight.T, targets, check_inputs=False),
        sarkern.linear_token_logprobs(hidden, weight, targets, check_inputs=False),
    ):
        bad = torch.zeros(n, dtype=torch.bool, device=DEVICE)
        bad[[3, 5]] = True
        assert out[bad].isnan().all()
        assert out[~bad].isfinite().all()
    good_targets = targets.clamp(0, vocab - 1)
    segments = torch.tensor([0, 0, 1, 1, 2, 2, 9, 9, -1, 0, 1, 2], device=DEVICE)
    ppl = sarkern.sequence_perplexity(hidden, weight, good_targets, segments, 3, check_inputs=False)
    kept = segments.clone()
    kept[kept >= 3] = -1
    expected = sarkern.sequence_perplexity(hidden, weight, good_targets, kept, 3)
    torch.testing.assert_close(ppl, expected, rtol=0, atol=0)
