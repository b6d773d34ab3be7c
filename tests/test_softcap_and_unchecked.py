"""`softcap` (final-logit soft-capping) and `check_inputs=False` on every op and backend.

Soft-capping is checked against the float64 reference with gradients: first at the mixed scales of real logits
(within the uncapped bound of `fp32_logprob_atol` plus 4 u cap per capped logit, moved at most twice that in a
log-prob or an entropy after the division by T), then for accuracy to fp32 rounding relative to each value, for
every |z|: the cap and its slope on their own, then the ops' log-probs and logit gradients (see "Accuracy").
"""

import math

import pytest
import torch
from op_helpers import (
    BACKENDS,
    DEVICE,
    FP32_UNIT_ROUNDOFF,
    HAS_TRITON,
    LOGPROB_ATOL,
    assert_grad_close,
    fp32_logprob_atol,
    lowp,
    random_targets,
)

import sarkern
from sarkern import chunked, ops, reference


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


# ------------------------------------------------------------------------------------------------------- Accuracy
# A logit much smaller than the cap must stay exact to its own scale (cap tanh(z / cap) ~ z), not to the cap's: the
# Triton kernels once formed tanh as (1 - e) / (1 + e), e = exp(-2|z / cap|), off by ~ cap u absolute (1e4 units of
# rounding at z = 1e-3, cap = 30), and both backends formed the slope as 1 - tanh^2 of the capped fp32 value, which
# is 0 from |z| = 9 cap on. Bounds in units u = 2^-24 of fp32 rounding:
#   the cap: z / cap and cap * t round by u/2 each, tanh is within 1 ulp (2 u: torch) or 3.2 u (the kernels: 1.1 u
#   by their polynomial below |z / cap| = 0.55, 3.2 u by exp beyond): CAP_ULPS = 6 relative;
#   the slope sech^2(z / cap) = 4e / (1 + e)^2 (kernels) or 1 / cosh^2 (torch): a few units, plus 2 |z / cap| u,
#   what the rounding of z / cap costs through the exponential's condition number.
U = FP32_UNIT_ROUNDOFF
CAP_ULPS = 6
SLOPE_ULPS = 6
CAP = 30.0


def _cap_sweep(cap: float) -> torch.Tensor:
    """fp32 logits from 1e-30 cap to 1e3 cap in magnitude, both signs, densely around the polynomial's end."""
    g = torch.Generator().manual_seed(11)
    magnitudes = torch.cat(
        [
            torch.logspace(-30, 3, 4000, dtype=torch.float64),
            torch.linspace(0.3, 1.0, 2000, dtype=torch.float64),
            torch.rand(2000, generator=g, dtype=torch.float64) * 20,
        ]
    )
    signs = torch.where(torch.rand(magnitudes.shape, generator=g) < 0.5, -1.0, 1.0).double()
    return (magnitudes * signs * cap).float()


def _exact_cap_and_slope(z: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    u = z.double() / cap
    return cap * torch.tanh(u), torch.cosh(u).reciprocal().square()


def _relative_error(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """|actual - expected| / |expected|, elementwise; a value below fp32's normal range (2^-126, where its spacing
    stops shrinking) is judged absolutely: an underflow is rounding too."""
    excess = ((actual.double() - expected).abs() - torch.finfo(torch.float32).tiny).clamp(min=0)
    return torch.where(excess > 0, excess / expected.abs(), 0.0)


if HAS_TRITON:
    import triton
    import triton.language as tl

    from sarkern.kernels._common import soft_cap, soft_cap_slope

    @triton.jit
    def _cap_kernel(z_ptr, capped_ptr, slope_ptr, n, cap, BLOCK: tl.constexpr):
        offsets = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        z = tl.load(z_ptr + offsets, mask=mask, other=0.0)
        tl.store(capped_ptr + offsets, soft_cap(z, cap), mask=mask)
        tl.store(slope_ptr + offsets, soft_cap_slope(z, cap), mask=mask)


def _backend_cap_and_slope(backend: str, z: torch.Tensor, cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The cap and its slope as the backend's ops compute them, on fp32 logits `z`."""
    if backend == "torch":
        return chunked._cap_and_scale_(z.clone(), cap, 1.0), chunked._softcap_slope(z, cap)
    z = z.to(DEVICE)
    capped, slope = torch.empty_like(z), torch.empty_like(z)
    block = 1024
    _cap_kernel[(triton.cdiv(z.numel(), block),)](z, capped, slope, z.numel(), cap, BLOCK=block)
    return capped.cpu(), slope.cpu()


@pytest.mark.parametrize("cap", [CAP, 0.5, 1e4])
def test_the_cap_and_its_slope_are_accurate_to_fp32_rounding_for_every_logit(backend, cap):
    z = _cap_sweep(cap)
    capped, slope = _backend_cap_and_slope(backend, z, cap)
    exact_capped, exact_slope = _exact_cap_and_slope(z, cap)
    cap_error = _relative_error(capped, exact_capped)
    worst = cap_error.argmax()
    assert cap_error.max() <= CAP_ULPS * U, f"cap off by {cap_error[worst] / U:.1f} u at z = {z[worst].item():.3e}"
    slope_bound = (SLOPE_ULPS + 2 * (z.double() / cap).abs()) * U
    slope_error = _relative_error(slope, exact_slope)
    worst = (slope_error / slope_bound).argmax()
    assert (slope_error <= slope_bound).all(), (
        f"slope off by {slope_error[worst] / U:.1f} u at z = {z[worst].item():.3e}"
    )
    # The sign is kept down to the smallest logits, and the cap is odd.
    assert torch.equal(capped.sign(), z.sign())
    assert torch.equal(_backend_cap_and_slope(backend, -z, cap)[0], -capped)


def test_the_cap_of_special_values(backend):
    z = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 3.0e38, -3.0e38])
    capped, slope = _backend_cap_and_slope(backend, z, CAP)
    torch.testing.assert_close(capped[:4], torch.tensor([0.0, -0.0, CAP, -CAP]), rtol=0, atol=0)
    assert capped[4].isnan() and slope[4].isnan()
    torch.testing.assert_close(capped[5:], torch.tensor([CAP, -CAP]), rtol=0, atol=0)
    torch.testing.assert_close(slope[[0, 1, 2, 3, 5, 6]], torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0]), rtol=0, atol=0)


def _accuracy_logits(case: str, rows: int, vocab: int, cap: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(rows * vocab)
    z = torch.randn(rows, vocab, generator=g, dtype=torch.float64)
    if case == "small":  # |z| ~ 1e-3 cap / 30: the linear part of tanh
        return (z * 1e-3 * cap / 30).float()
    if case == "large":  # |z| ~ 7 cap: saturated
        return (z * 7 * cap).float()
    spread = torch.logspace(-5, 1.5, vocab, dtype=torch.float64)[torch.randperm(vocab, generator=g)]
    return (z * spread * cap).float()  # mixed: from 1e-5 cap to 30 cap in one row


def _assert_logprobs_and_grads_accurate(logprobs, grad, expected_logprobs, expected_grad, z, cap, temperature):
    """Against float64, with bounds from fp32 rounding (u = 2^-24), relative to each value:
    x = cap tanh(z / cap) / T is within CAP_ULPS u + u/2 of |x|; lse = m + log s moves by at most the largest of
    those errors, plus u |lse| for its own rounding, the relative error of the sum s of exponentials (its terms
    within (|x - m| + 2) u each, weighted by p) and (log2 V + 4) u for summing them in blocks; a log-prob
    (x_t - m) - log s adds u |log p| for its rounding.
    A gradient (onehot - p) slope / T: p = exp(x - lse) is within |error of x - lse| + u |x - lse| + 2 u
    relatively, and the slope within (SLOPE_ULPS + 2 |z / cap|) u; then two roundings of the products."""
    x = (cap * torch.tanh(z.double() / cap)) / temperature
    lse = torch.logsumexp(x, dim=-1, keepdim=True)
    vocab = z.shape[-1]
    x_error = (CAP_ULPS + 0.5) * U * x.abs()
    p = torch.softmax(x, dim=-1)
    term_error = (p * ((x - x.amax(-1, keepdim=True)).abs() + 2)).sum(-1, keepdim=True) * U  # s's terms, weighted
    lse_error = x_error.amax(-1, keepdim=True) + U * lse.abs() + term_error + (math.log2(vocab) + 4) * U
    logprob_bound = (2 * x_error.amax(-1) + lse_error.squeeze(-1) + U * expected_logprobs.abs()).where(
        expected_logprobs != 0, 0.0
    )
    error = (logprobs.double() - expected_logprobs).abs()
    worst = (error / logprob_bound.clamp(min=1e-300)).argmax()
    assert (error <= logprob_bound).all(), (
        f"log-prob off by {error.flatten()[worst] / U:.1f} u (bound {logprob_bound.flatten()[worst] / U:.1f} u)"
    )
    p_error = x_error + lse_error + U * (x - lse).abs() + 2 * U
    slope_error = (SLOPE_ULPS + 2 * (z.double() / cap).abs()) * U
    grad_bound = p_error + slope_error + 2 * U
    # The target's own entry (1 - p) is within p's error times p / (1 - p) of itself: no larger where p < 1/2.
    grad_error = _relative_error(grad, expected_grad)
    worst = (grad_error / grad_bound).argmax()
    assert (grad_error <= grad_bound).all(), (
        f"logit gradient off by {grad_error.flatten()[worst] / U:.1f} u (bound {grad_bound.flatten()[worst] / U:.1f} u)"
        f" at z = {z.flatten()[worst].item():.3e}"
    )


@pytest.mark.parametrize("case", ["small", "large", "mixed"])
@pytest.mark.parametrize("cap,temperature", [(CAP, 1.0), (1e3, 0.7)])
def test_token_logprobs_softcap_accurate_to_fp32_rounding(backend, case, cap, temperature):
    rows, vocab = 6, 300
    z = _accuracy_logits(case, rows, vocab, cap)
    targets = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    logits, logits_ref = z.clone().to(DEVICE).requires_grad_(True), z.double().to(DEVICE).requires_grad_(True)
    out = sarkern.token_logprobs(logits, targets, temperature=temperature, softcap=cap)
    ref = reference.token_logprobs(logits_ref, targets, temperature=temperature, softcap=cap)
    out.sum().backward()
    ref.sum().backward()
    _assert_logprobs_and_grads_accurate(
        out.detach().cpu(), logits.grad.cpu(), ref.detach().cpu(), logits_ref.grad.cpu(), z, cap, temperature
    )


@pytest.mark.parametrize("case", ["small", "large", "mixed"])
def test_linear_token_logprobs_softcap_accurate_to_fp32_rounding(backend, case):
    """One-hot hidden states make every logit a weight entry, exactly (one product by 1 per sum), so what is left
    is the cap's rounding and the log-softmax's; the weight's gradient is then the logit gradient itself."""
    rows, vocab, cap = 6, 300, CAP
    z = _accuracy_logits(case, rows, vocab, cap)
    dim = 8
    columns = torch.randperm(dim, generator=torch.Generator().manual_seed(4))[:rows]
    hidden = torch.zeros(rows, dim)
    hidden[torch.arange(rows), columns] = 1.0
    weight = torch.zeros(vocab, dim)
    weight[:, columns] = z.T
    targets = torch.randint(0, vocab, (rows,), generator=torch.Generator().manual_seed(5)).to(DEVICE)
    w, w_ref = weight.clone().to(DEVICE).requires_grad_(True), weight.double().to(DEVICE).requires_grad_(True)
    out = sarkern.linear_token_logprobs(hidden.to(DEVICE), w, targets, softcap=cap)
    ref = reference.linear_token_logprobs(hidden.double().to(DEVICE), w_ref, targets, softcap=cap)
    out.sum().backward()
    ref.sum().backward()
    grad, grad_ref = w.grad.cpu()[:, columns].T, w_ref.grad.cpu()[:, columns].T
    _assert_logprobs_and_grads_accurate(out.detach().cpu(), grad, ref.detach().cpu(), grad_ref, z, cap, 1.0)


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
