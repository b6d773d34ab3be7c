"""What users would run instead of sarkern, each as a factory `(inputs, backward) -> zero-argument callable`.

Two families, each compared side by side at the same inputs:
- `LINEAR`: per-token log-probs from hidden states and the LM-head weight;
- `LOGITS`: per-token log-probs from logits that already exist.

A contender that cannot run here raises `Unavailable` with the reason; the suite reports it as skipped.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

import sarkern


class Unavailable(Exception):
    """This contender cannot run on this machine; the message says why."""


@dataclass
class Inputs:
    hidden: torch.Tensor | None  # [N, D] for LINEAR
    weight: torch.Tensor | None  # [V, D] for LINEAR
    logits: torch.Tensor | None  # [N, V] for LOGITS
    targets: torch.Tensor  # [N]

    def leaves(self) -> list[torch.Tensor]:
        return [t for t in (self.hidden, self.weight, self.logits) if t is not None]


def make_inputs(
    family: str,
    n: int,
    d: int,
    v: int,
    dtype: torch.dtype,
    device: str,
    requires_grad: bool,
    seed=0,
    *,
    generate_on_device: bool = False,
):
    """Random inputs (never zeros). Drawn on the CPU by default, so every device sees the same numbers;
    `generate_on_device` draws them where they live (gigabytes of logits would take long on the CPU)."""
    where = device if generate_on_device else "cpu"
    g = torch.Generator(device=where).manual_seed(seed)
    targets = torch.randint(0, v, (n,), generator=g, device=where).to(device)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, device=where) * scale).to(device=device, dtype=dtype)

    if family == "logits":
        return Inputs(None, None, randn(n, v, scale=3.0).requires_grad_(requires_grad), targets)
    hidden = randn(n, d).requires_grad_(requires_grad)
    weight = randn(v, d, scale=d**-0.5).requires_grad_(requires_grad)
    return Inputs(hidden, weight, None, targets)


def runner(compute, inputs: Inputs, backward: bool):
    """Forward under no_grad, or forward + backward of the summed log-probs (gradients cleared each call)."""

    def forward_only():
        with torch.no_grad():
            return compute(inputs)

    def forward_backward():
        for leaf in inputs.leaves():
            leaf.grad = None
        out = compute(inputs)
        out.sum().backward()
        return out

    return forward_backward if backward else forward_only


def _require_module(name: str, extra: str = "bench") -> None:
    if importlib.util.find_spec(name) is None:
        raise Unavailable(f"{name} is not installed (pip install 'sarkern[{extra}]')")


def _require_cuda(inputs: Inputs, what: str) -> None:
    if inputs.targets.device.type != "cuda":
        raise Unavailable(f"{what}: CUDA only (no CPU implementation)")


# ------------------------------------------------------------------------------------------------------ LINEAR


def sarkern_linear(inputs: Inputs, backward: bool):
    return runner(lambda x: sarkern.linear_token_logprobs(x.hidden, x.weight, x.targets), inputs, backward)


def naive_linear(inputs: Inputs, backward: bool):
    """Full fp32 logits, then log_softmax and gather: what most RL code does."""

    def compute(x):
        logits = (x.hidden @ x.weight.T).float()
        return torch.log_softmax(logits, dim=-1).gather(-1, x.targets[:, None]).squeeze(-1)

    return runner(compute, inputs, backward)


def trl_chunked_linear(inputs: Inputs, backward: bool):
    """TRL's fused LM-head log-prob (the path behind `add_fused_lm_head`), with its default chunk size."""
    _require_module("trl", "train")
    from trl.kernels import ChunkedLogProbFunction
    from trl.trainer.utils import _CHUNKED_LOGPROB_CHUNK_SIZE

    def compute(x):
        out = ChunkedLogProbFunction.apply(
            x.hidden, x.weight, None, x.targets, 1.0, _CHUNKED_LOGPROB_CHUNK_SIZE, None, 1.0, ("log_probs",)
        )
        return out[0]

    return runner(compute, inputs, backward)


def torch_linear_cross_entropy(inputs: Inputs, backward: bool):
    """`torch.nn.functional.linear_cross_entropy(..., reduction="none")` with its chunked implementation."""
    if not hasattr(torch.nn.functional, "linear_cross_entropy"):
        raise Unavailable(f"torch {torch.__version__} has no nn.functional.linear_cross_entropy")
    from torch.nn.modules.linear_cross_entropy_options import LinearCrossEntropyOptions

    options = LinearCrossEntropyOptions()

    def compute(x):
        return -torch.nn.functional.linear_cross_entropy(
            x.hidden, x.weight, x.targets, reduction="none", options=options
        )

    return runner(compute, inputs, backward)


def liger_linear(inputs: Inputs, backward: bool):
    """Liger-Kernel's fused linear cross entropy, `reduction="none"`."""
    _require_module("liger_kernel")
    _require_cuda(inputs, "Liger-Kernel's Triton kernels")
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    def compute(x):
        loss = liger_fused_linear_cross_entropy(x.hidden, x.weight, x.targets, reduction="none")
        return -(loss[0] if isinstance(loss, tuple) else loss)

    return runner(compute, inputs, backward)


def liger_scaled_linear(inputs: Inputs, backward: bool):
    """Liger-Kernel's fused scaled cross entropy: per-token NLL from its Hopper (SM90) CuTe DSL kernel."""
    _require_module("liger_kernel")
    _require_cuda(inputs, "Liger-Kernel's fused scaled cross entropy")
    capability = torch.cuda.get_device_capability(inputs.targets.device)
    if capability != (9, 0):
        # Elsewhere Liger dispatches to a chunked PyTorch fallback, which is not the kernel this contender means.
        raise Unavailable(f"its CuTe DSL kernel needs compute capability 9.0 (this GPU: {capability})")
    from liger_kernel.ops.fused_linear_scaled_cross_entropy import (
        LigerFusedLinearScaledCrossEntropyFunction,
        _load_sm90_function,
    )

    try:
        _load_sm90_function()
    except ImportError as why:
        raise Unavailable(f"its SM90 kernel needs NVIDIA's CuTe DSL (pip install nvidia-cutlass-dsl): {why}") from why

    def compute(x):
        return -LigerFusedLinearScaledCrossEntropyFunction.apply(x.hidden, x.weight, x.targets)

    return runner(compute, inputs, backward)


def cce_linear(inputs: Inputs, backward: bool):
    """Apple's Cut Cross-Entropy, `reduction="none"`."""
    _require_module("cut_cross_entropy")
    _require_cuda(inputs, "Cut Cross-Entropy's Triton kernels")
    from cut_cross_entropy import linear_cross_entropy

    def compute(x):
        return -linear_cross_entropy(x.hidden, x.weight, x.targets, reduction="none")

    return runner(compute, inputs, backward)


# ------------------------------------------------------------------------------------------------------ LOGITS


def sarkern_logits(inputs: Inputs, backward: bool):
    return runner(lambda x: sarkern.token_logprobs(x.logits, x.targets), inputs, backward)


def naive_logits(inputs: Inputs, backward: bool):
    def compute(x):
        return torch.log_softmax(x.logits.float(), dim=-1).gather(-1, x.targets[:, None]).squeeze(-1)

    return runner(compute, inputs, backward)


def trl_selective_log_softmax(inputs: Inputs, backward: bool):
    _require_module("trl", "train")
    from trl.trainer.utils import selective_log_softmax

    return runner(lambda x: selective_log_softmax(x.logits, x.targets), inputs, backward)


LINEAR = {
    "sarkern": sarkern_linear,
    "naive": naive_linear,
    "trl_chunked": trl_chunked_linear,
    "torch_linear_ce": torch_linear_cross_entropy,
    "liger": liger_linear,
    "liger_scaled": liger_scaled_linear,
    "cce": cce_linear,
}
LOGITS = {
    "sarkern": sarkern_logits,
    "naive": naive_logits,
    "trl_selective": trl_selective_log_softmax,
}
FAMILIES = {"linear": LINEAR, "logits": LOGITS}
