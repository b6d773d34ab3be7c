"""TMA descriptor loads of the GEMM operands (`kernels/_common.py`): which layouts take them, how `SARKERN_TMA`
forces either path, and that the descriptor path gives the reference's numbers. Triton's interpreter emulates
tensor descriptors (zero fill past the edges included), so the same kernel source runs here as on an H100; whether
the compiled code issues TMA copies is the compile check's part (`test_kernel_compile_check.py`)."""

import pytest
import torch
from test_linear_token_logprobs import check_against_reference

pytest.importorskip("triton")

from sarkern.kernels import _common  # noqa: E402
from sarkern.kernels._common import TMA_VARIABLE, TensorDescriptor, tma_loads  # noqa: E402


@pytest.fixture
def descriptor_calls(monkeypatch):
    """Records whether each GEMM operand handed to a kernel was a descriptor."""
    calls = []
    real = _common.gemm_operand

    def recording(tensor, block_rows, block_d, tma):
        out = real(tensor, block_rows, block_d, tma)
        calls.append(isinstance(out, TensorDescriptor))
        return out

    from sarkern.kernels import linear_logprobs, linear_logprobs_grad

    monkeypatch.setattr(linear_logprobs, "gemm_operand", recording)
    monkeypatch.setattr(linear_logprobs_grad, "gemm_operand", recording)
    monkeypatch.setenv("SARKERN_BACKEND", "triton")
    return calls


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "lead,dim,vocab",
    [((1,), 16, 40), ((37,), 24, 101), ((2, 9), 40, 257)],
    ids=["one-token", "odd-vocab-and-tokens", "D-past-one-block"],
)
def test_descriptor_path_matches_reference(descriptor_calls, monkeypatch, dtype, lead, dim, vocab):
    """Forward and backward through descriptors, against float64, on tiles that overhang every edge."""
    monkeypatch.setenv(TMA_VARIABLE, "1")
    check_against_reference(lead, dim, vocab, dtype, seed=dim * vocab)
    assert descriptor_calls and all(descriptor_calls)  # forward and every gradient tile


def test_pointer_path_when_forced_off(descriptor_calls, monkeypatch):
    monkeypatch.setenv(TMA_VARIABLE, "0")
    check_against_reference((11,), 24, 50, torch.bfloat16, seed=3)
    assert descriptor_calls and not any(descriptor_calls)


def _bf16(rows, dim, offset=0):
    return torch.zeros(rows * dim + offset, dtype=torch.bfloat16)[offset:].view(rows, dim)


def test_auto_selection(monkeypatch):
    """Unset: descriptors on sm_90 and later when every operand allows; pointers before sm_90, interpreted, and for
    layouts TMA cannot address."""
    monkeypatch.delenv(TMA_VARIABLE, raising=False)
    aligned = _bf16(4, 64)
    assert tma_loads(90, aligned, aligned) and tma_loads(100, aligned)
    assert not tma_loads(80, aligned) and not tma_loads(0, aligned)
    assert not tma_loads(90, aligned, _bf16(4, 63))  # row stride of 126 bytes
    assert not tma_loads(90, _bf16(4, 64, offset=1))  # start 2 bytes past an aligned address
    assert not tma_loads(90, _bf16(64, 4).T)  # last dim not contiguous
    assert not tma_loads(90, torch.zeros(4, 64))  # fp32 operands feed FMA, not tensor cores


def test_column_slice_takes_descriptors(monkeypatch):
    """A view with an aligned row stride (hidden states sliced from a wider buffer) is still TMA-addressable."""
    monkeypatch.delenv(TMA_VARIABLE, raising=False)
    assert tma_loads(90, _bf16(4, 128)[:, 64:])


@pytest.mark.parametrize(
    "setting,arch,operand,match",
    [
        ("1", 80, _bf16(4, 64), "compute capability 9.0"),
        ("1", 90, _bf16(4, 63), "row stride"),
        ("1", 90, _bf16(4, 64, offset=1), "16-byte aligned"),
        ("1", 90, torch.zeros(4, 64), "16-bit"),
        ("yes", 90, _bf16(4, 64), "expected 1"),
    ],
)
def test_forced_descriptors_refuse_what_cannot_take_them(monkeypatch, setting, arch, operand, match):
    monkeypatch.setenv(TMA_VARIABLE, setting)
    with pytest.raises(ValueError, match=f"{TMA_VARIABLE}.*{match}"):
        tma_loads(arch, operand)


def test_forced_descriptors_are_refused_through_the_op(descriptor_calls, monkeypatch):
    """The refusal reaches the caller of the op by name, before any kernel runs."""
    monkeypatch.setenv(TMA_VARIABLE, "1")
    hidden = torch.randn(3, 63).bfloat16()  # 126-byte rows
    weight = torch.randn(10, 63).bfloat16()
    with pytest.raises(ValueError, match=TMA_VARIABLE):
        import sarkern

        sarkern.linear_token_logprobs(hidden, weight, torch.tensor([1, 2, 3]))


def test_the_forward_plan_names_its_loads_tiles_and_splits(monkeypatch):
    """`plan_forward` (what the launcher runs, and what `make gpu-check` reports beside its times)."""
    from sarkern.kernels.linear_logprobs import plan_forward

    hidden, weight = torch.randn(40, 32).bfloat16(), torch.randn(300, 32).bfloat16()
    monkeypatch.setenv(TMA_VARIABLE, "1")
    monkeypatch.setenv("SARKERN_FORWARD_FLATTEN", "1")
    targets = torch.zeros(40, dtype=torch.int64)
    plan = plan_forward(hidden, weight, None, targets, return_entropy=True, splits=3)
    assert plan.tma and plan.constexprs["FLATTEN"] and plan.constexprs["RETURN_ENTROPY"]
    assert (plan.splits, plan.tiles_per_split) == (3, 4)  # 10 tiles of 32 columns: 4 + 4 + 2
    assert plan.describe() == (
        "16x32x16 w1 s1, TMA, flattened loop, 2 resident programs, 3 vocabulary splits of 4 tiles"
    )
    monkeypatch.setenv(TMA_VARIABLE, "0")
    monkeypatch.delenv("SARKERN_FORWARD_FLATTEN")
    assert "pointer loads," in plan_forward(hidden, weight, None, targets, return_entropy=False).describe()
