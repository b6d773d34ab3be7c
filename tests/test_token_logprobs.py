"""`token_logprobs` (from existing logits) on every backend against the float64 reference."""

import pytest
import torch
from op_helpers import BACKENDS, DEVICE, DTYPES, LOGPROB_ATOL, assert_grad_close, lowp, random_targets

import sarkern
from sarkern import reference


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("SARKERN_BACKEND", request.param)
    return request.param


def _check(logits64: torch.Tensor, targets, dtype, *, temperature=1.0, ignore_index=-100, scale=3.0, seed=0):
    torch.manual_seed(seed)
    logits, logits_ref = lowp(logits64 * scale, dtype)
    logits.requires_grad_(True)
    logits_ref.requires_grad_(True)
    logprobs, entropy = sarkern.token_logprobs(
        logits, targets, temperature=temperature, ignore_index=ignore_index, return_entropy=True
    )
    ref_logprobs, ref_entropy = reference.token_logprobs(
        logits_ref, targets, temperature=temperature, ignore_index=ignore_index, return_entropy=True
    )
    assert logprobs.dtype == torch.float32 and entropy.dtype == torch.float32
    assert logprobs.shape == targets.shape and entropy.shape == targets.shape
    atol = LOGPROB_ATOL[dtype]
    torch.testing.assert_close(logprobs.double(), ref_logprobs, atol=atol, rtol=0)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=atol, rtol=0)

    weights = torch.randn(targets.shape, dtype=torch.float64, device=DEVICE)
    ent_weights = torch.randn(targets.shape, dtype=torch.float64, device=DEVICE)
    ((logprobs * weights).sum() + (entropy * ent_weights).sum()).backward()
    ((ref_logprobs * weights).sum() + (ref_entropy * ent_weights).sum()).backward()
    assert logits.grad.dtype == dtype and logits.grad.shape == logits.shape
    assert_grad_close(logits.grad, logits_ref.grad, dtype, "grad logits")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "shape", [(1, 1), (1, 7), (5, 100), (3, 4, 257), (2, 1000)], ids=lambda s: "x".join(map(str, s))
)
def test_matches_reference(backend, dtype, shape):
    torch.manual_seed(sum(shape))
    targets = random_targets(shape[:-1], shape[-1])
    _check(torch.randn(shape, dtype=torch.float64), targets, dtype)


@pytest.mark.parametrize("temperature", [0.6, 1.7])
def test_temperature_and_custom_ignore_index(backend, temperature):
    torch.manual_seed(1)
    targets = random_targets((6, 129), 300, ignore_index=-1)
    _check(
        torch.randn(6, 129, 300, dtype=torch.float64), targets, torch.float32, temperature=temperature, ignore_index=-1
    )


def test_strided_logits_are_read_in_place(backend):
    """`logits[:, :-1]` (the usual shift for next-token log-probs) is not contiguous over the leading dims."""
    torch.manual_seed(2)
    full = torch.randn(3, 9, 70, device=DEVICE)
    logits = full[:, :-1]
    assert not logits.is_contiguous()
    targets = random_targets((3, 8), 70)
    out = sarkern.token_logprobs(logits, targets)
    torch.testing.assert_close(out.double(), reference.token_logprobs(logits.double(), targets), atol=1e-5, rtol=0)
    # Gradients land at the strided rows' own positions.
    full.requires_grad_(True)
    full_ref = full.detach().double().requires_grad_(True)
    weights = torch.randn(3, 8, dtype=torch.float64, device=DEVICE)
    (sarkern.token_logprobs(full[:, :-1], targets) * weights).sum().backward()
    (reference.token_logprobs(full_ref[:, :-1], targets) * weights).sum().backward()
    assert_grad_close(full.grad, full_ref.grad, torch.float32, "grad of strided logits")


def test_extreme_logits(backend):
    """Logits of magnitude 1e4 and -inf entries: exact log-probs and entropy, finite gradients."""
    torch.manual_seed(3)
    vocab = 300
    logits = (torch.rand(8, vocab, device=DEVICE) * 2 - 1) * 1e4
    logits[:, ::7] = float("-inf")
    targets = torch.randint(0, vocab, (8,), device=DEVICE)
    targets[targets % 7 == 0] += 1  # keep targets on finite logits
    logits.requires_grad_(True)
    logprobs, entropy = sarkern.token_logprobs(logits, targets, return_entropy=True)
    ref_logprobs, ref_entropy = reference.token_logprobs(logits.detach().double(), targets, return_entropy=True)
    torch.testing.assert_close(logprobs.double(), ref_logprobs, atol=1e-5, rtol=1e-6)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=1e-5, rtol=0)
    logprobs.sum().backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[:, ::7] == 0).all()


def test_target_on_minus_inf_logit_gives_minus_inf(backend):
    logits = torch.zeros(2, 40, device=DEVICE)
    logits[0, 5] = float("-inf")
    out = sarkern.token_logprobs(logits, torch.tensor([5, 6], device=DEVICE))
    assert out[0].item() == float("-inf")
    assert out[1].item() == pytest.approx(-torch.log(torch.tensor(40.0)).item(), abs=1e-6)


def test_ignored_positions_are_zero_without_gradient(backend):
    logits = torch.randn(4, 50, device=DEVICE, requires_grad=True)
    targets = torch.tensor([-100, 3, -100, 49], device=DEVICE)
    logprobs, entropy = sarkern.token_logprobs(logits, targets, return_entropy=True)
    assert logprobs[0] == 0 and logprobs[2] == 0 and entropy[0] == 0 and entropy[2] == 0
    (logprobs.sum() + entropy.sum()).backward()
    assert (logits.grad[0] == 0).all() and (logits.grad[2] == 0).all()
    assert logits.grad[1].abs().sum() > 0


def test_entropy_not_requested_returns_tensor(backend):
    logits = torch.randn(3, 11, device=DEVICE)
    out = sarkern.token_logprobs(logits, torch.tensor([1, 2, 3], device=DEVICE))
    assert isinstance(out, torch.Tensor) and out.shape == (3,)


def test_ignored_row_of_minus_inf_logits_has_zero_gradient(backend):
    """A fully masked row (all -inf, e.g. padding) that is also ignored must not poison the gradient with NaN."""
    logits = torch.randn(3, 20, device=DEVICE)
    logits[1] = float("-inf")
    logits.requires_grad_(True)
    logprobs, entropy = sarkern.token_logprobs(logits, torch.tensor([1, -100, 2], device=DEVICE), return_entropy=True)
    (logprobs.sum() + entropy.sum()).backward()
    assert torch.isfinite(logits.grad).all() and (logits.grad[1] == 0).all()


def test_empty_inputs(backend):
    logits = torch.randn(2, 3, 0, 5, device=DEVICE, requires_grad=True)
    out = sarkern.token_logprobs(logits, torch.zeros(2, 3, 0, dtype=torch.long, device=DEVICE))
    assert out.shape == (2, 3, 0)
    hidden = torch.randn(0, 8, device=DEVICE, requires_grad=True)
    weight = torch.randn(11, 8, device=DEVICE, requires_grad=True)
    out = sarkern.linear_token_logprobs(hidden, weight, torch.zeros(0, dtype=torch.long, device=DEVICE))
    out.sum().backward()
    assert out.shape == (0,) and (weight.grad == 0).all()
