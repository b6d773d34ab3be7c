"""`linear_token_logprobs` (from hidden states and the LM head) on every backend against the float64 reference."""

import pytest
import torch
from op_helpers import BACKENDS, DEVICE, DTYPES, LOGPROB_ATOL, assert_grad_close, lowp, random_targets

import sarkern
from sarkern import chunked, reference


@pytest.fixture(params=BACKENDS)
def backend(request, monkeypatch):
    monkeypatch.setenv("SARKERN_BACKEND", request.param)
    return request.param


def make_inputs(lead, dim, vocab, dtype, *, bias=True, seed=0, logit_scale=3.0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(*lead, dim, generator=g, dtype=torch.float64)
    weight = torch.randn(vocab, dim, generator=g, dtype=torch.float64) * logit_scale / dim**0.5
    b = torch.randn(vocab, generator=g, dtype=torch.float64) if bias else None
    pairs = [lowp(t, dtype) if t is not None else (None, None) for t in (hidden, weight, b)]
    targets = random_targets(tuple(lead), vocab, generator=g)
    return pairs, targets


def check_against_reference(lead, dim, vocab, dtype, *, bias=True, temperature=1.0, seed=0):
    (h, h_ref), (w, w_ref), (b, b_ref) = make_inputs(lead, dim, vocab, dtype, bias=bias, seed=seed)[0]
    targets = make_inputs(lead, dim, vocab, dtype, bias=bias, seed=seed)[1]
    leaves = [t for t in (h, w, b) if t is not None]
    ref_leaves = [t for t in (h_ref, w_ref, b_ref) if t is not None]
    for t in leaves + ref_leaves:
        t.requires_grad_(True)
    logprobs, entropy = sarkern.linear_token_logprobs(
        h, w, targets, bias=b, temperature=temperature, return_entropy=True
    )
    ref_logprobs, ref_entropy = reference.linear_token_logprobs(
        h_ref, w_ref, targets, bias=b_ref, temperature=temperature, return_entropy=True
    )
    assert logprobs.shape == targets.shape and logprobs.dtype == torch.float32
    atol = LOGPROB_ATOL[dtype]
    torch.testing.assert_close(logprobs.double(), ref_logprobs, atol=atol, rtol=0)
    torch.testing.assert_close(entropy.double(), ref_entropy, atol=atol, rtol=0)

    g = torch.Generator().manual_seed(seed + 1)
    weights = torch.randn(targets.shape, generator=g, dtype=torch.float64).to(DEVICE)
    ent_weights = torch.randn(targets.shape, generator=g, dtype=torch.float64).to(DEVICE)
    ((logprobs * weights).sum() + (entropy * ent_weights).sum()).backward()
    ((ref_logprobs * weights).sum() + (ref_entropy * ent_weights).sum()).backward()
    for name, leaf, ref_leaf in zip(("hidden", "weight", "bias"), leaves, ref_leaves):
        assert leaf.grad.dtype == dtype and leaf.grad.shape == leaf.shape
        assert_grad_close(leaf.grad, ref_leaf.grad, dtype, f"grad {name}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "lead,dim,vocab",
    [((1,), 16, 40), ((37,), 24, 101), ((2, 9), 37, 257), ((70,), 20, 33)],
    ids=["one-token", "odd-vocab", "batch-time-oddD", "tokens-over-block"],
)
def test_matches_reference(backend, dtype, lead, dim, vocab):
    check_against_reference(lead, dim, vocab, dtype, seed=dim + vocab)


@pytest.mark.parametrize("temperature", [0.5, 1.3])
def test_temperature_without_bias(backend, temperature):
    check_against_reference((23,), 24, 90, torch.float32, bias=False, temperature=temperature, seed=5)


def test_gradient_of_logprobs_alone(backend):
    """Only log-probs enter the loss (no entropy): the common training case."""
    (h, h_ref), (w, w_ref), _ = make_inputs((19,), 24, 77, torch.float32, bias=False)[0]
    targets = make_inputs((19,), 24, 77, torch.float32)[1]
    h.requires_grad_(True)
    h_ref.requires_grad_(True)
    sarkern.linear_token_logprobs(h, w, targets).sum().backward()
    reference.linear_token_logprobs(h_ref, w_ref, targets).sum().backward()
    assert_grad_close(h.grad, h_ref.grad, torch.float32, "grad hidden")


def test_torch_path_multi_tile(monkeypatch):
    """Force tiny tiles so the chunked path merges many vocabulary tiles and token chunks."""
    monkeypatch.setenv("SARKERN_BACKEND", "torch")
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 64)
    monkeypatch.setattr(chunked, "MAX_VOCAB_CHUNK", 16)
    check_against_reference((2, 13), 24, 101, torch.float32, seed=7)


@pytest.mark.triton_interpreter
@pytest.mark.parametrize("num_splits", [1, 3, 7])
def test_triton_vocab_splits(num_splits, monkeypatch):
    """The forward splits the vocabulary across programs; every split count must give the same numbers."""
    pytest.importorskip("triton")
    from sarkern import kernels

    (h, _), (w, _), (b, _) = make_inputs((21,), 24, 230, torch.float32, seed=3)[0]
    targets = make_inputs((21,), 24, 230, torch.float32, seed=3)[1]
    logprobs, entropy, lse, _, _ = kernels.linear_logprobs_forward(h, w, b, targets, 1.0, -100, True, splits=num_splits)
    ref_lp, ref_ent = reference.linear_token_logprobs(
        h.double(), w.double(), targets, bias=b.double(), return_entropy=True
    )
    torch.testing.assert_close(logprobs.double(), ref_lp, atol=1e-5, rtol=0)
    torch.testing.assert_close(entropy.double(), ref_ent, atol=1e-5, rtol=0)
    ref_lse = torch.logsumexp(h.double() @ w.double().T + b.double(), -1)
    torch.testing.assert_close(lse.double(), ref_lse, atol=1e-5, rtol=1e-6)


def test_large_logit_magnitude(backend):
    """Hidden states that produce logits near 1e3: the log-prob is formed without losing fp32 resolution."""
    (h, h_ref), (w, w_ref), _ = make_inputs((17,), 16, 64, torch.float32, bias=False, logit_scale=300.0)[0]
    targets = make_inputs((17,), 16, 64, torch.float32)[1]
    out = sarkern.linear_token_logprobs(h, w, targets)
    ref = reference.linear_token_logprobs(h_ref, w_ref, targets)
    torch.testing.assert_close(out.double(), ref, atol=1e-3, rtol=1e-5)


def test_bf16_gradients_accumulate_in_fp32_on_the_torch_path(monkeypatch):
    """Many token chunks and signed upstream gradients (partial sums larger than the result): a bf16 rounding per
    chunk would show; fp32 accumulation leaves only the final rounding of the exact gradient to bf16."""
    monkeypatch.setenv("SARKERN_BACKEND", "torch")
    monkeypatch.setattr(chunked, "TILE_ELEMENTS", 32 * 64)  # [32 tokens x 64 vocab] tiles: 64 token chunks
    g = torch.Generator().manual_seed(0)
    n, dim, vocab = 2048, 64, 512
    hidden = torch.randn(n, dim, generator=g).bfloat16().to(DEVICE).requires_grad_(True)
    weight = (torch.randn(vocab, dim, generator=g) * 0.3).bfloat16().to(DEVICE).requires_grad_(True)
    targets = torch.randint(0, vocab, (n,), generator=g).to(DEVICE)
    upstream = torch.randn(n, generator=g).to(DEVICE)
    hidden_ref = hidden.detach().double().requires_grad_(True)
    weight_ref = weight.detach().double().requires_grad_(True)
    (sarkern.linear_token_logprobs(hidden, weight, targets) * upstream).sum().backward()
    (reference.linear_token_logprobs(hidden_ref, weight_ref, targets) * upstream.double()).sum().backward()
    for ours, exact in ((weight.grad, weight_ref.grad), (hidden.grad, hidden_ref.grad)):
        final_rounding = (exact.bfloat16().double() - exact).abs().max()
        assert (ours.double() - exact).abs().max() <= 1.25 * final_rounding


def _check_fp32_product(device):
    """`_add_product_fp32(acc, a, b)` from 16-bit operands is `acc + a @ b` to fp32 accuracy (the error bound of an
    fp32-accumulated dot product of k terms), far inside the half-ulp of bf16 that rounding the product would cost."""
    from sarkern.kernels.linear_logprobs_grad import _add_product_fp32

    g = torch.Generator().manual_seed(3)
    k = 1024
    a = torch.randn(64, k, generator=g).bfloat16().to(device)
    b = torch.randn(k, 48, generator=g).bfloat16().to(device)
    acc = torch.randn(64, 48, generator=g).to(device)
    exact = acc.double() + a.double() @ b.double()
    out = _add_product_fp32(acc.clone(), a, b)
    assert out.dtype == torch.float32
    bound = (k + 2) * 2.0**-24 * (acc.double().abs() + a.double().abs() @ b.double().abs())
    assert ((out.double() - exact).abs() <= bound).all()
    assert (bound < 2.0**-9 * exact.abs().max()).all()  # a bf16 rounding of the product could not pass


def test_hidden_gradient_products_stay_fp32():
    pytest.importorskip("triton")
    _check_fp32_product("cpu")


def test_splits_follow_the_compiled_kernels_occupancy(monkeypatch):
    """On a GPU the split count comes from how many programs of the compiled kernel fit on an SM (registers per
    warp in units of 256, shared memory plus the driver's 1 KiB), found once per variant and device."""
    pytest.importorskip("triton")
    from types import SimpleNamespace

    from sarkern.kernels import linear_logprobs

    class Compiled:  # what Triton's warmup returns, as far as occupancy goes
        n_regs, metadata = 182, SimpleNamespace(num_warps=4, shared=99360)

        def _init_handles(self):
            pass

    h100 = SimpleNamespace(
        multi_processor_count=132,
        regs_per_multiprocessor=65536,
        shared_memory_per_multiprocessor=233472,
        max_threads_per_multi_processor=2048,
    )
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: h100)
    monkeypatch.setattr(linear_logprobs, "_PROGRAMS_PER_SM", {})
    compiles = []

    def compile_variant(regs=182, warps=4):
        compiles.append(regs)
        compiled = Compiled()
        compiled.n_regs, compiled.metadata = regs, SimpleNamespace(num_warps=warps, shared=99360)
        return compiled

    gpu = torch.device("cuda", 0)
    assert linear_logprobs.resident_programs(gpu, ("tile",), compile_variant) == 2 * 132  # 23 x 256 regs per warp
    assert linear_logprobs.resident_programs(gpu, ("tile",), compile_variant) == 2 * 132 and len(compiles) == 1
    assert linear_logprobs.resident_programs(gpu, ("fat",), lambda: compile_variant(255, warps=8)) == 132
    assert linear_logprobs.num_splits(128, 1187, 264) == 17 and linear_logprobs.num_splits(128, 1187, 132) == 12
    # One token block (N <= 128) spreads over at most MAX_SPLITS programs, whose combine tile stays 2048 values.
    assert linear_logprobs.num_splits(1, 1187, 264) == linear_logprobs.MAX_SPLITS == 128
    monkeypatch.setattr(linear_logprobs, "interpreting", lambda: False)
    assert linear_logprobs.combine_tile(12) == (16, 128) and linear_logprobs.combine_tile(128) == (128, 16)


@pytest.mark.triton_interpreter
def test_flattened_tile_loop_candidate(monkeypatch):
    """SARKERN_FORWARD_FLATTEN=1 changes only how the compiler pipelines the forward's loops (a `make gpu-check`
    candidate): the numbers stay the reference's, and a malformed value is refused by name."""
    pytest.importorskip("triton")
    monkeypatch.setenv("SARKERN_BACKEND", "triton")
    monkeypatch.setenv("SARKERN_FORWARD_FLATTEN", "1")
    check_against_reference((37,), 24, 101, torch.bfloat16, seed=4)
    monkeypatch.setenv("SARKERN_FORWARD_FLATTEN", "true")
    with pytest.raises(ValueError, match="SARKERN_FORWARD_FLATTEN"):
        check_against_reference((5,), 16, 40, torch.bfloat16)


def test_forward_tile_override_is_validated(monkeypatch):
    """SARKERN_FORWARD_BLOCKS (the tile candidates `make gpu-check` times) overrides the table on a GPU, and a
    malformed value is refused by name rather than launched."""
    pytest.importorskip("triton")
    from sarkern.kernels.linear_logprobs_tiles import Blocks, forward_blocks

    monkeypatch.setenv("SARKERN_FORWARD_BLOCKS", "128,64,64,4,4")
    assert forward_blocks(torch.bfloat16, 90) == Blocks(128, 64, 64, 4, 4)
    assert forward_blocks(torch.bfloat16, 0).block_n == 16  # the interpreter keeps its tiny tiles
    for bad in ("128,64,64,4", "128,60,64,4,4", "a,b,c,d,e", "128,64,64,4,0"):
        monkeypatch.setenv("SARKERN_FORWARD_BLOCKS", bad)
        with pytest.raises(ValueError, match="SARKERN_FORWARD_BLOCKS"):
            forward_blocks(torch.bfloat16, 90)


def test_launchers_run_on_the_operands_cuda_device(monkeypatch):
    """Triton launches on the current CUDA device: every public launcher makes its operands' device current first
    (a model on cuda:1 in a process whose current device is cuda:0). Checked with a stand-in device guard."""
    pytest.importorskip("triton")
    import contextlib
    from unittest import mock

    from sarkern import kernels
    from sarkern.kernels._common import on_operand_device

    entered = []

    @contextlib.contextmanager
    def device_guard(device):
        entered.append(device)
        yield

    monkeypatch.setattr(torch.cuda, "device", device_guard)
    launcher = on_operand_device(lambda *args: "launched")
    with mock.patch.object(torch.Tensor, "is_cuda", new_callable=mock.PropertyMock, return_value=True):
        assert launcher(None, torch.zeros(1), 3) == "launched"
    assert entered == [torch.device("cpu")]  # the stand-in records which tensor's device was made current
    assert launcher(torch.zeros(1)) == "launched" and len(entered) == 1  # CPU tensors: no guard
    for name in kernels.__all__:
        assert getattr(kernels, name).__wrapped__, name  # every public launcher is wrapped
