"""Helpers shared by the launchers."""

from __future__ import annotations

import os

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


TORCH_TO_TL = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


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
