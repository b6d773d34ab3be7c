"""Helpers shared by the launchers."""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


def interpreting() -> bool:
    """True when Triton runs kernels with its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def on_operand_device(launcher):
    """Runs `launcher` with the CUDA device of its first tensor argument current. Triton launches on the current
    device, which need not hold the tensors (a model placed on cuda:1 by a process whose current device is cuda:0),
    and descriptors and occupancy are read for the current device too."""

    @functools.wraps(launcher)
    def on_device(*args, **kwargs):
        tensor = next(a for a in args if isinstance(a, torch.Tensor))
        if not tensor.is_cuda:
            return launcher(*args, **kwargs)
        with torch.cuda.device(tensor.device):
            return launcher(*args, **kwargs)

    return on_device


def dot_upcast(dtype: torch.dtype) -> bool:
    """Whether `tl.dot` operands must be upcast to fp32 before the product.

    Triton's interpreter (3.9) multiplies bf16 operands of `tl.dot` as raw bits and returns garbage, so under the
    interpreter bf16 tiles are converted to fp32 first. Compiled kernels keep bf16 tensor-core products with fp32
    accumulation; the values agree because bf16 x bf16 products are exact in fp32.
    """
    return interpreting() and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 operands get IEEE products: tf32 would break the 1e-5 tolerance of DESIGN.md section 5."""
    return "ieee" if dtype == torch.float32 or dot_upcast(dtype) else "tf32"


# Natural log <-> log2: the kernels work in log2 units (x * log2(e)) so that every exponential is a bare exp2.
# Globals a compiled kernel reads must be constexpr (Triton's interpreter accepts plain floats and hides that);
# launchers use `.value`.
LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


def arch_family(device: torch.device) -> int:
    """Compute capability as 80, 90, ... for a CUDA device; 0 elsewhere (the interpreter)."""
    if device.type != "cuda":
        return 0
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


@dataclass(frozen=True)
class Blocks:
    """A launch configuration: tile sizes (constexprs) and Triton's warps and pipeline stages."""

    block_n: int
    block_v: int
    block_d: int = 0
    num_warps: int = 4
    num_stages: int = 1
    # Programs per SM the tile was chosen to fit on the GPUs the table targets (the compile check fails if fewer fit;
    # the launchers size their grids from the compiled kernel itself).
    ctas_per_sm: int = 1


def occupancy(
    registers: int,
    shared: int,
    warps: int,
    *,
    regs_per_sm: int = 65536,
    smem_per_sm: int,
    threads_per_sm: int = 2048,
    ctas_per_sm: int = 32,
    reserved_smem_per_cta: int = 1024,
) -> tuple[int, str]:
    """Programs of a kernel that fit on one SM at once, and what limits them: registers (allocated per warp in units
    of 256), shared memory (the driver reserves 1 KiB per program from sm_80 on), threads, or program slots."""
    regs_per_warp = -(-registers * 32 // 256) * 256
    limits = {
        "registers": regs_per_sm // (regs_per_warp * warps) if regs_per_warp else ctas_per_sm,
        "shared memory": smem_per_sm // (shared + reserved_smem_per_cta),
        "threads": threads_per_sm // (32 * warps),
        "CTA slots": ctas_per_sm,
    }
    limit = min(limits, key=limits.get)
    return limits[limit], limit


def compiled_programs_per_sm(compiled, device: torch.device) -> int:
    """`occupancy` of a compiled Triton kernel on a CUDA device (at least 1)."""
    compiled._init_handles()  # loads the module; registers are known from then on
    props = torch.cuda.get_device_properties(device)
    smem = getattr(props, "shared_memory_per_multiprocessor", 0) or compiled.metadata.shared + 1024
    count, _ = occupancy(
        compiled.n_regs,
        compiled.metadata.shared,
        compiled.metadata.num_warps,
        regs_per_sm=getattr(props, "regs_per_multiprocessor", 65536),
        smem_per_sm=smem,
        threads_per_sm=props.max_threads_per_multi_processor,
    )
    return max(1, count)


# ---------------------------------------------------------------------------------------- TMA operand loads
# On Hopper (sm_90) and later, the GEMM operands (hidden rows, LM-head rows) are read through TMA tensor descriptors:
# the copy engine moves each [rows, BLOCK_D] tile into shared memory asynchronously, zero-filling past the tensor's
# edges, so the kernel computes no per-element addresses or masks (fewer registers and issued instructions in the
# GEMM loop). TMA needs 16-bit operands (fp32 ones feed FMA, not tensor cores), a 16-byte aligned base and row stride
# and a contiguous last dim; anything else takes pointer loads. `SARKERN_TMA=0` forces pointer loads everywhere (to
# time them, `make gpu-check`); `SARKERN_TMA=1` forces descriptors and refuses what cannot take them (a GPU before
# sm_90, an fp32 or unaligned operand). Triton's interpreter emulates descriptors, so tests run that path on the CPU
# with `SARKERN_TMA=1`.
TMA_VARIABLE = "SARKERN_TMA"


def env_switch(name: str, meaning: str) -> bool | None:
    """An on/off environment variable: True for 1, False for 0, None when unset; anything else is refused by name."""
    text = os.environ.get(name, "").strip()
    if text not in ("", "0", "1"):
        raise ValueError(f"{name}={text!r}: expected 1 ({meaning}), 0 (not) or unset (the default)")
    return None if text == "" else text == "1"


def _tma_layout_problem(tensor: torch.Tensor) -> str | None:
    """Why `tensor [rows, D]` cannot be read through a TMA descriptor, or None when it can."""
    if tensor.dtype not in (torch.bfloat16, torch.float16):
        # fp32 tiles feed FMA, not tensor cores: from shared memory they need a layout conversion that spills
        # hundreds of registers (compile report), so fp32 keeps pointer loads.
        return f"TMA loads serve 16-bit tensor-core GEMMs, not {tensor.dtype} operands"
    if tensor.stride(-1) != 1:
        return "its last dim is not contiguous"
    if tensor.data_ptr() % 16:
        return "its start is not 16-byte aligned"
    if (tensor.stride(0) * tensor.element_size()) % 16:
        return f"its row stride ({tensor.stride(0)} elements) is not a multiple of 16 bytes"
    if max(tensor.shape) >= 2**31:
        return "a dim exceeds TMA's 32-bit coordinates"
    return None


def tma_loads(arch: int, *operands: torch.Tensor) -> bool:
    """Whether a GEMM kernel on compute capability `arch` (0: interpreted) reads `operands` through TMA descriptors."""
    forced = env_switch(TMA_VARIABLE, "TMA descriptor loads")
    if forced is False:
        return False
    problems = [problem for t in operands if (problem := _tma_layout_problem(t))]
    if forced is None:
        return 90 <= arch and not problems
    if 0 < arch < 90:
        raise ValueError(f"{TMA_VARIABLE}=1, but TMA needs compute capability 9.0 or later (this GPU: {arch / 10})")
    if problems:
        raise ValueError(f"{TMA_VARIABLE}=1, but an operand cannot be read through TMA: {problems[0]}")
    return True


def gemm_operand(tensor: torch.Tensor, block_rows: int, block_d: int, tma: bool):
    """`tensor [rows, D]` as a kernel reads it: a TMA descriptor of `[block_rows, block_d]` tiles, or the tensor."""
    return TensorDescriptor.from_tensor(tensor, [block_rows, block_d]) if tma else tensor


@dataclass(frozen=True)
class KernelSpec:
    """One configuration a launcher can choose, as the ahead-of-time compile check builds it (see compile_report):
    `pointers` maps pointer arguments to element types (others are fp32), `floats` names the fp32 scalars (other
    scalars are i32), `gemm_dtype` is the operand type of the kernel's `tl.dot` loop, if it has one, and
    `ctas_per_sm` the programs per SM the tile was chosen to fit; `descriptors` names the arguments passed as TMA tensor
    descriptors, whose loads the compiled code must issue as TMA copies."""

    name: str
    kernel: Any
    constexprs: dict
    num_warps: int
    num_stages: int
    pointers: dict = field(default_factory=dict)
    floats: tuple = ()
    gemm_dtype: str | None = None
    ctas_per_sm: int | None = None  # at least this many must fit per SM (checked against the compiled code)
    descriptors: dict = field(default_factory=dict)  # TMA descriptor arguments: name -> (element type, block shape)


# Triton signature names of the operand dtypes (compile_specs).
TL_TYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def gemm_constexprs(dtype: torch.dtype, blocks: Blocks, tma: bool) -> dict:
    """The constexprs every kernel built on `_logits_tile` passes it: how its operands are read and multiplied, and
    the tile sizes."""
    return dict(
        UPCAST=dot_upcast(dtype),
        PRECISION=dot_precision(dtype),
        TMA=tma,
        BLOCK_N=blocks.block_n,
        BLOCK_V=blocks.block_v,
        BLOCK_D=blocks.block_d,
    )


def gemm_kernel_spec(
    kernel,
    label: str,
    dtype: torch.dtype,
    blocks: Blocks,
    tma: bool,
    constexprs: dict,
    *,
    pointers: dict | None = None,
    floats: tuple = (),
    ctas_per_sm: int | None = None,
) -> KernelSpec:
    """The `KernelSpec` of a kernel built on `_logits_tile` (hidden and weight as pointers or TMA descriptors, a
    bias pointer, int64 targets, `logit_scale` and `softcap`), for operands of `dtype` in `blocks` tiles."""
    name = TL_TYPE_NAMES[dtype]
    tile = f"{blocks.block_n}x{blocks.block_v}x{blocks.block_d}"
    return KernelSpec(
        name=f"{kernel.__name__}[{name}, {label}, {tile}{', TMA' if tma else ''}]",
        kernel=kernel,
        constexprs={**constexprs, **gemm_constexprs(dtype, blocks, tma)},
        num_warps=blocks.num_warps,
        num_stages=blocks.num_stages,
        pointers=dict(hidden=name, weight=name, bias_ptr=name, targets_ptr="i64", **(pointers or {})),
        descriptors=(
            dict(hidden=(name, (blocks.block_n, blocks.block_d)), weight=(name, (blocks.block_v, blocks.block_d)))
            if tma
            else {}
        ),
        floats=("logit_scale", "softcap", *floats),
        gemm_dtype=name,
        ctas_per_sm=ctas_per_sm,
    )


# tanh(a) = a + a^3 P(a^2) for |a| < 0.55: a weighted least-squares fit (Chebyshev nodes in a^2) of
# (tanh(a) - a) / a^3, within 0.02 units of fp32 rounding of tanh in exact arithmetic, 1.1 evaluated in fp32. There
# (1 - e) / (1 + e) with e = exp(-2a) would lose e / (1 - e) of relative precision to the rounding of e: 1 / (2a)
# units, 10^4 at a = 3e-5 (a logit of 1e-3 at cap 30). From 0.55 on, it is within 3.2 units.
_TANH_POLY_END_SQUARED = tl.constexpr(0.55 * 0.55)
_TANH_C0 = tl.constexpr(-0.33333316445350647)
_TANH_C1 = tl.constexpr(0.13332565128803253)
_TANH_C2 = tl.constexpr(-0.05385029688477516)
_TANH_C3 = tl.constexpr(0.021064136177301407)
_TANH_C4 = tl.constexpr(-0.006264368072152138)


@triton.jit
def soft_cap(z, cap):
    """`cap * tanh(z / cap)` (Gemma 2's final-logit soft-capping) in fp32, within a few units of fp32 rounding of
    the result for every z (relative: small logits stay exact to their own scale, not to the cap's).

    Branch-free: an odd polynomial near 0 and `(1 - e) / (1 + e)` from `exp` of a non-positive argument elsewhere,
    which never overflows and maps +-inf to +-cap (and NaN to NaN). Triton's interpreter has no tanh nor expm1, so
    the same source runs on the CPU tests and the GPU."""
    # Ordered to keep few values live per element (a 64x64 fp32 tile holds 32 per thread): the exp branch first,
    # then the polynomial, which is odd, so both carry the sign of u.
    u = z / cap
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    t = tl.where(u < 0, -t, t)
    s = u * u
    poly = _TANH_C3 + s * _TANH_C4
    poly = _TANH_C2 + s * poly
    poly = _TANH_C1 + s * poly
    poly = _TANH_C0 + s * poly
    t = tl.where(s < _TANH_POLY_END_SQUARED, u + u * (s * poly), t)
    return cap * t


@triton.jit
def soft_cap_slope(z, cap):
    """d soft_cap(z) / dz = 1 - tanh^2(z / cap) = 4e / (1 + e)^2 with e = exp(-2|z / cap|), from the raw logit z.

    Not from the capped value: where tanh rounds to +-1 in fp32, 1 - tanh^2 of it keeps no correct digit (0 from
    |z| = 9 cap on). This form has no cancellation: a few units of rounding plus the 2|z / cap| that the rounding
    of z / cap costs any fp32 evaluation."""
    e = tl.exp(-2.0 * tl.abs(z / cap))
    return 4.0 * e / ((1.0 + e) * (1.0 + e))
