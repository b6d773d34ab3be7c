"""The Triton kernels compiled for a real GPU, at DESIGN.md's shape; skipped without CUDA."""

import pytest
import torch

import sarkern
from sarkern import reference

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
]


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("SARKERN_BACKEND", "triton")


def _reference_chunked(hidden, weight, targets, chunk=1024):
    """float64 reference a chunk of tokens at a time, so the [N, V] float64 logits never exist at once."""
    out = [
        reference.linear_token_logprobs(
            hidden[i : i + chunk].double(), weight.double(), targets[i : i + chunk], return_entropy=True
        )
        for i in range(0, hidden.shape[0], chunk)
    ]
    return torch.cat([o[0] for o in out]), torch.cat([o[1] for o in out])


@pytest.mark.parametrize("n_tokens", [16384, 1])
def test_design_shape_forward_bf16(n_tokens):
    """N x V = 2.5e9 > 2^31 exercises the int64 offsets."""
    torch.manual_seed(0)
    dim, vocab = 4096, 151936
    hidden = torch.randn(n_tokens, dim, device="cuda", dtype=torch.bfloat16)
    weight = (torch.randn(vocab, dim, device="cuda") / dim**0.5 * 3).bfloat16()
    targets = torch.randint(0, vocab, (n_tokens,), device="cuda")
    targets[::11] = -100
    logprobs, entropy = sarkern.linear_token_logprobs(hidden, weight, targets, return_entropy=True)
    ref_logprobs, ref_entropy = _reference_chunked(hidden, weight, targets)
    torch.testing.assert_close(logprobs.double(), ref_logprobs, atol=2e-2, rtol=0)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=2e-2, rtol=0)


def check_forward_backward(
    n, dim, vocab, dtype, *, seed, logit_scale=3.0, entropy_weight=0.5, softcap=None, device="cuda"
):
    """Log-probs, entropy and the gradients of `sum(lp) + entropy_weight * sum(entropy)` against float64, at
    DESIGN.md's tolerances (fp32 1e-5, 16-bit 2e-2; gradients relative to their largest entry)."""
    torch.manual_seed(seed)
    hidden = torch.randn(n, dim, device=device, dtype=torch.float64).to(dtype)
    weight = (torch.randn(vocab, dim, device=device, dtype=torch.float64) / dim**0.5 * logit_scale).to(dtype)
    targets = torch.randint(0, vocab, (n,), device=device)
    leaves = [hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)]
    ref_leaves = [hidden.double().requires_grad_(True), weight.double().requires_grad_(True)]
    lp, ent = sarkern.linear_token_logprobs(*leaves, targets, return_entropy=True, softcap=softcap)
    ref_lp, ref_ent = reference.linear_token_logprobs(*ref_leaves, targets, return_entropy=True, softcap=softcap)
    (lp.sum() + entropy_weight * ent.sum()).backward()
    (ref_lp.sum() + entropy_weight * ref_ent.sum()).backward()
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(lp.double(), ref_lp, atol=tol, rtol=0)
    torch.testing.assert_close(ent.double(), ref_ent, atol=tol, rtol=0)
    for leaf, ref in zip(leaves, ref_leaves):
        scale = ref.grad.abs().max().item()
        torch.testing.assert_close(leaf.grad.double(), ref.grad, atol=tol * scale, rtol=tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_backward_matches_reference(dtype):
    check_forward_backward(2048, 1024, 32003, dtype, seed=1)


LOADS = {
    "auto": {},
    "pointers": {"SARKERN_TMA": "0"},
    "descriptors": {"SARKERN_TMA": "1"},
    "flattened-loop": {"SARKERN_FORWARD_FLATTEN": "1"},
}


@pytest.mark.parametrize("loads", LOADS)
@pytest.mark.parametrize("dim", [1000, 1001])
def test_operand_loads_match_reference(monkeypatch, loads, dim):
    """Every way the GEMM kernels can read hidden and weight rows: TMA descriptors (the default from sm_90, when
    the rows are 16-byte aligned), pointer loads, and the flattened-loop candidate, forward and backward, on tiles
    that overhang every edge. 1001 bf16 values make 2002-byte rows, which TMA cannot address: auto takes pointers,
    and forcing descriptors is refused."""
    from sarkern.kernels._common import TMA_VARIABLE

    for name, value in LOADS[loads].items():
        monkeypatch.setenv(name, value)
    if loads == "descriptors" and (dim % 8 or torch.cuda.get_device_capability()[0] < 9):
        with pytest.raises(ValueError, match=TMA_VARIABLE):
            check_forward_backward(999, dim, 32003, torch.bfloat16, seed=dim)
        return
    check_forward_backward(999, dim, 32003, torch.bfloat16, seed=dim)


def test_hidden_gradient_products_leave_cublas_in_fp32():
    """The backward's `grad_tile @ weight` uses cuBLAS's fp32-output GEMM (`mm(out_dtype=)`), not a bf16 result."""
    from test_linear_token_logprobs import _check_fp32_product

    _check_fp32_product("cuda")


def test_token_logprobs_design_shape_bf16():
    torch.manual_seed(2)
    logits = (torch.randn(8192, 151936, device="cuda") * 4).bfloat16()
    targets = torch.randint(0, 151936, (8192,), device="cuda")
    out = sarkern.token_logprobs(logits, targets)
    ref = torch.cat(
        [reference.token_logprobs(logits[i : i + 512].double(), targets[i : i + 512]) for i in range(0, 8192, 512)]
    )
    torch.testing.assert_close(out.double(), ref, atol=2e-2, rtol=0)


@pytest.mark.parametrize("softcap", [None, 30.0])
def test_softcap_and_entropy_gradients_bf16(softcap):
    """The heavy kernel variants (soft-capping, entropy gradient) run their own tile configurations on a GPU."""
    check_forward_backward(
        1024, 512, 50257, torch.bfloat16, seed=3, logit_scale=40.0, entropy_weight=-0.3, softcap=softcap
    )


def test_unchecked_ops_run_without_host_sync_and_capture_in_a_cuda_graph():
    """`check_inputs=False`: no device-to-host sync (torch raises on one in "error" mode), so the ops can be captured
    in a CUDA graph, whose replay gives the eager numbers."""
    torch.manual_seed(4)
    n, dim, vocab = 4096, 1024, 32000
    hidden = torch.randn(n, dim, device="cuda").bfloat16()
    weight = (torch.randn(vocab, dim, device="cuda") / dim**0.5 * 3).bfloat16()
    targets = torch.randint(0, vocab, (n,), device="cuda")
    segments = torch.arange(n, device="cuda") // 512

    def run():
        lp = sarkern.linear_token_logprobs(hidden, weight, targets, check_inputs=False)
        ppl = sarkern.sequence_perplexity(hidden, weight, targets, segments, 8, check_inputs=False)
        return lp, ppl

    def run_without_sync():
        # Only around sarkern's calls: torch's own graph capture may synchronize on entry.
        torch.cuda.set_sync_debug_mode("error")
        try:
            return run()
        finally:
            torch.cuda.set_sync_debug_mode("default")

    eager = run()
    torch.cuda.synchronize()
    run_without_sync()
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run_without_sync()  # warm-up on the capture stream
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = run_without_sync()
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured[0], eager[0], atol=0, rtol=0)
    # The per-segment sums are atomic adds, whose order may differ between runs: fp32 rounding of 512 terms.
    torch.testing.assert_close(captured[1], eager[1], atol=0, rtol=512 * 2.0**-23)
