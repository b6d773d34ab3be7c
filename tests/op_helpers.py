"""Inputs and comparisons shared by the op tests."""

from __future__ import annotations

import importlib.util

import pytest
import torch

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
HAS_TRITON = importlib.util.find_spec("triton") is not None
# On CPU the Triton backend runs interpreted (tests/conftest.py): same kernel source, small shapes only.
BACKENDS = [
    "torch",
    pytest.param("triton", marks=pytest.mark.skipif(not HAS_TRITON, reason="triton is not installed")),
]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# DESIGN.md section 5: absolute tolerance per token on log-probs.
LOGPROB_ATOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-2}


def lowp(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(x in `dtype` on the test device, the same rounded values in float64): the reference sees what the op sees."""
    rounded = x.to(dtype)
    return rounded.to(DEVICE), rounded.double().to(DEVICE)


def random_targets(shape, vocab: int, ignore_index: int = -100, ignore_fraction: float = 0.2, generator=None):
    targets = torch.randint(0, vocab, shape, generator=generator)
    mask = torch.rand(shape, generator=generator) < ignore_fraction
    return targets.masked_fill(mask, ignore_index).to(DEVICE)


def assert_grad_close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> None:
    """Gradients: 1e-5 for fp32; for 16-bit inputs a tolerance relative to the gradient's scale, since the
    logit-gradient tiles and the GEMMs that consume them run in the input dtype."""
    scale = expected.abs().max().item() or 1.0
    if dtype == torch.float32:
        atol, rtol = 1e-5 * max(1.0, scale), 1e-4
    else:
        atol, rtol = 2e-2 * scale, 2e-2
    torch.testing.assert_close(actual.double(), expected, atol=atol, rtol=rtol, msg=lambda m: f"{what}: {m}")


FP32_UNIT_ROUNDOFF = 2.0**-24


def fp32_logprob_atol(abs_terms: torch.Tensor, n_terms: int, temperature: float) -> float:
    """Absolute bound on an fp32 log-prob (or entropy) against float64 on the same inputs, never below DESIGN.md's
    1e-5. Each logit is a sum of `n_terms` products (0: the logits are given) whose absolute values add up to at most
    `abs_terms.max()` (for given logits, |logit|); first-order rounding puts it within (n_terms + 2) u of that scale
    after the division by the temperature (u = 2^-24), and a log-prob `(x_t - max) - log s` moves by at most twice
    the largest logit error."""
    scale = abs_terms.abs().max().item() if abs_terms.numel() else 0.0
    return max(1e-5, 2 * (n_terms + 2) * FP32_UNIT_ROUNDOFF * scale / temperature)
