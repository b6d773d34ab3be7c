"""Bad input is refused with an error that names the problem, before any kernel runs."""

import pytest
import torch
from op_helpers import BACKENDS, DEVICE

import sarkern


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("SARKERN_BACKEND", request.param)
    return request.param


def lin(n=5, d=8, v=11, dtype=torch.float32):
    return torch.randn(n, d, dtype=dtype, device=DEVICE), torch.randn(v, d, dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("bad", [11, 500, -5])
def test_target_outside_vocab(backend, bad):
    h, w = lin()
    targets = torch.tensor([0, 1, bad, 3, -100], device=DEVICE)
    with pytest.raises(ValueError, match=r"targets must be in \[0, 11\)"):
        sarkern.linear_token_logprobs(h, w, targets)
    with pytest.raises(ValueError, match=r"targets must be in \[0, 11\)"):
        sarkern.token_logprobs(h @ w.T, targets)
    with pytest.raises(ValueError, match=r"targets must be in \[0, 11\)"):
        sarkern.sequence_perplexity(h, w, targets, torch.zeros(5, dtype=torch.long, device=DEVICE), 1)


def test_shape_mismatches(backend):
    h, w = lin()
    targets = torch.zeros(5, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="disagree on D"):
        sarkern.linear_token_logprobs(h, torch.randn(11, 9, device=DEVICE), targets)
    with pytest.raises(ValueError, match="targets must have shape"):
        sarkern.linear_token_logprobs(h, w, targets[:4])
    with pytest.raises(ValueError, match="targets must have shape"):
        sarkern.token_logprobs(h @ w.T, targets[:, None])
    with pytest.raises(ValueError, match="weight must be"):
        sarkern.linear_token_logprobs(h, w[None], targets)
    with pytest.raises(ValueError, match="empty vocabulary"):
        sarkern.linear_token_logprobs(h, w[:0], targets)
    with pytest.raises(ValueError, match="bias must have shape"):
        sarkern.linear_token_logprobs(h, w, targets, bias=torch.zeros(10, device=DEVICE))
    with pytest.raises(ValueError, match="segment_ids must have the shape"):
        sarkern.sequence_perplexity(h, w, targets, targets[:3], 1)


def test_non_floating_and_mismatched_dtypes(backend):
    h, w = lin()
    targets = torch.zeros(5, dtype=torch.long, device=DEVICE)
    with pytest.raises(TypeError, match="logits must be float32, bfloat16 or float16"):
        sarkern.token_logprobs(torch.ones(5, 11, dtype=torch.long, device=DEVICE), targets)
    with pytest.raises(TypeError, match="hidden must be float32"):
        sarkern.linear_token_logprobs(h.double(), w, targets)
    with pytest.raises(TypeError, match="share a dtype"):
        sarkern.linear_token_logprobs(h, w.bfloat16(), targets)
    with pytest.raises(TypeError, match="targets must hold integer ids"):
        sarkern.linear_token_logprobs(h, w, targets.float())
    with pytest.raises(TypeError, match="segment_ids must hold integer ids"):
        sarkern.sequence_perplexity(h, w, targets, targets.float(), 1)


def test_mismatched_devices(backend):
    h, w = lin()
    targets = torch.zeros(5, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="one device"):
        sarkern.linear_token_logprobs(h, w.to("meta"), targets)
    with pytest.raises(ValueError, match="one device"):
        sarkern.token_logprobs(h @ w.T, targets.to("meta"))


def test_ignore_marker_inside_a_segment_is_refused(backend):
    """Every token of a segment counts towards its perplexity: -100 there is an error, not a silent skip."""
    h, w = lin()
    targets = torch.tensor([0, -100, 2, 3, 4], device=DEVICE)
    with pytest.raises(ValueError, match=r"targets must be in \[0, 11\); found -100"):
        sarkern.sequence_perplexity(h, w, targets, torch.zeros(5, dtype=torch.long, device=DEVICE), 1)
    segments = torch.tensor([0, -1, 0, 0, 0], device=DEVICE)  # outside every segment: not read
    assert torch.isfinite(sarkern.sequence_perplexity(h, w, targets, segments, 1)).all()


def test_segment_ids_out_of_range(backend):
    h, w = lin()
    targets = torch.zeros(5, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="segment_ids must be below num_segments=2"):
        sarkern.sequence_perplexity(h, w, targets, torch.tensor([0, 1, 2, 0, 0], device=DEVICE), 2)
    with pytest.raises(ValueError, match="num_segments"):
        sarkern.sequence_perplexity(h, w, targets, targets, -1)


@pytest.mark.parametrize("temperature", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature(backend, temperature):
    h, w = lin()
    with pytest.raises(ValueError, match="temperature"):
        sarkern.linear_token_logprobs(h, w, torch.zeros(5, dtype=torch.long, device=DEVICE), temperature=temperature)


def test_unknown_backend_name(monkeypatch):
    monkeypatch.setenv("SARKERN_BACKEND", "cuda-magic")
    with pytest.raises(ValueError, match="SARKERN_BACKEND"):
        sarkern.token_logprobs(torch.randn(2, 3), torch.zeros(2, dtype=torch.long))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_triton_on_cpu_without_interpreter_is_refused(monkeypatch):
    monkeypatch.setenv("SARKERN_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        sarkern.token_logprobs(torch.randn(2, 3), torch.zeros(2, dtype=torch.long))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal")
def test_triton_on_an_interpreter_that_cannot_run_the_kernels_is_refused_by_name(monkeypatch):
    """Triton 3.6's interpreter with numpy >= 2.4 fails inside every kernel with a loop: refused before any kernel,
    naming the versions and the way out."""
    pytest.importorskip("triton")
    from sarkern import backends

    monkeypatch.setenv("SARKERN_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert backends.interpreter_problem() is None or "interpreter" in backends.interpreter_problem()
    broken = "Triton's interpreter cannot run a loop over a runtime bound here (triton 3.6.0, numpy 2.5.2: ...)"
    monkeypatch.setattr(backends, "_interpreter_probe", lambda: broken)
    with pytest.raises(RuntimeError, match=r"runtime bound here \(triton 3\.6\.0.*SARKERN_BACKEND=torch"):
        sarkern.token_logprobs(torch.randn(2, 3), torch.zeros(2, dtype=torch.long))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert backends.interpreter_problem() is None  # compiled kernels: nothing to probe
