"""Which implementation runs an op: the Triton kernels or the chunked PyTorch path.

`SARKERN_BACKEND` (read at every call) picks it:
- `auto` (default): Triton for CUDA tensors when Triton is importable, the chunked PyTorch path otherwise;
- `triton`: always the Triton kernels; CPU tensors need `TRITON_INTERPRET=1` (Triton's interpreter);
- `torch`: always the chunked PyTorch path.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import warnings
from functools import lru_cache

import torch

BACKENDS = ("auto", "triton", "torch")


@lru_cache(maxsize=1)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


@lru_cache(maxsize=1)
def _warn_no_triton_on_cuda() -> None:
    warnings.warn(
        "sarkern: Triton is not installed, so CUDA tensors use the chunked PyTorch path (slower). "
        "Install triton or set SARKERN_BACKEND=torch to silence this warning.",
        RuntimeWarning,
        stacklevel=3,
    )


def interpreter_problem() -> str | None:
    """Why Triton's CPU interpreter cannot run sarkern's kernels here, or None (it can, or it is not in use).

    Known case: Triton 3.6's interpreter holds a scalar as a 1-element numpy array and converts it with `int()`,
    which numpy >= 2.4 refuses, so every kernel with a loop over a runtime bound (all of sarkern's) fails deep in
    the interpreter. A one-loop probe kernel finds it (and any other breakage of that kind) once per process."""
    if os.environ.get("TRITON_INTERPRET", "0") != "1" or not triton_available():
        return None
    return _interpreter_probe()


def _probe_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def sum_to_n(out_ptr, n):
        total = 0
        for i in range(0, n):
            total += i
        tl.store(out_ptr, total)

    return sum_to_n


@lru_cache(maxsize=1)
def _interpreter_probe() -> str | None:
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _probe_kernel()[(1,)](out, 4)
    except Exception as error:  # noqa: BLE001 - whatever the interpreter raises, it cannot run the kernels
        versions = ", ".join(f"{name} {importlib.metadata.version(name)}" for name in ("triton", "numpy"))
        return (
            f"Triton's interpreter cannot run a loop over a runtime bound here ({versions}: "
            f"{type(error).__name__}: {str(error)[:120]}); Triton 3.6 needs numpy<2.4 (Triton 3.9 runs it)"
        )
    if int(out) != 6:
        return f"Triton's interpreter computed {int(out)} for 0+1+2+3 in a probe kernel"
    return None


def requested_backend() -> str:
    name = os.environ.get("SARKERN_BACKEND", "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"SARKERN_BACKEND={name!r} is not one of {BACKENDS}")
    return name


def select_backend(device: torch.device) -> str:
    """'triton' or 'torch' for tensors on `device`, or a clear error when the request cannot be honoured."""
    name = requested_backend()
    if name == "torch":
        return "torch"
    if name == "triton":
        if not triton_available():
            raise RuntimeError("SARKERN_BACKEND=triton but Triton is not installed (pip install triton)")
        if device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError(
                "SARKERN_BACKEND=triton on CPU tensors needs Triton's interpreter: set TRITON_INTERPRET=1 "
                "before sarkern's kernels are first used (it is slow, meant for tests), or use SARKERN_BACKEND=torch"
            )
        problem = interpreter_problem() if device.type == "cpu" else None
        if problem is not None:
            raise RuntimeError(f"SARKERN_BACKEND=triton on CPU tensors: {problem}; or use SARKERN_BACKEND=torch")
        if device.type not in ("cpu", "cuda"):
            raise RuntimeError(f"SARKERN_BACKEND=triton does not support {device.type} tensors")
        return "triton"
    if device.type == "cuda":
        if triton_available():
            return "triton"
        _warn_no_triton_on_cuda()
    return "torch"


def kernels():
    """The Triton kernels module, imported on first use (importing it needs Triton)."""
    from sarkern import kernels as module

    return module
