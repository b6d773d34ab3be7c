"""Helpers shared by the launchers."""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import triton
import triton.language as tl


def interpreting() -> bool:
    """True when Triton runs kernels with its CPU interpreter (`TRITON_INTERPRET=1`)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


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
    # Programs per SM on the GPUs the table targets, as the compile check finds them (it fails if they differ).
    ctas_per_sm: int = 1


@dataclass(frozen=True)
class KernelSpec:
    """One configuration a launcher can choose, as the ahead-of-time compile check builds it (see compile_report):
    `pointers` maps pointer arguments to element types (others are fp32), `floats` names the fp32 scalars (other
    scalars are i32), `gemm_dtype` is the operand type of the kernel's `tl.dot` loop, if it has one, and
    `ctas_per_sm` the occupancy the launcher assumes."""

    name: str
    kernel: Any
    constexprs: dict
    num_warps: int
    num_stages: int
    pointers: dict = field(default_factory=dict)
    floats: tuple = ()
    gemm_dtype: str | None = None
    ctas_per_sm: int | None = None  # what the launcher assumes (sizing its grid), checked against the compiled code


# Triton signature names of the operand dtypes (compile_specs).
TL_TYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@triton.jit
def soft_cap(z, cap):
    """`cap * tanh(z / cap)` (Gemma 2's final-logit soft-capping) in fp32.

    Built from `exp` of a non-positive argument, so it never overflows and maps +-inf to +-cap; Triton's interpreter
    has no tanh. Its absolute error is a few units of fp32 rounding times `cap`, which the op tests account for."""
    e = tl.exp(-2.0 * tl.abs(z / cap))
    t = (1.0 - e) / (1.0 + e)
    return cap * tl.where(z < 0, -t, t)


@triton.jit
def soft_cap_slope(capped, cap):
    """d capped / d z = 1 - tanh^2, from the capped value itself."""
    t = capped / cap
    return 1.0 - t * t
