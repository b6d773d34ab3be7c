"""Whether Triton's CPU interpreter (`--tiny`, TRITON_INTERPRET=1) can run a kernel with a loop over a runtime bound,
as every sarkern kernel has; where it cannot, the tiny run refuses sarkern's Triton rows by name before timing any.

Known case: Triton 3.6's interpreter holds a scalar as a 1-element numpy array and turns it into a Python int with
`int(array)` (`tensor.__index__` in triton/runtime/interpreter.py), which numpy 2.4 and later refuse ("only
0-dimensional arrays can be converted to Python scalars"), so `range(0, n)` in a kernel fails. Triton 3.9 runs it.
Only the interpreter is concerned: on a GPU the kernels are compiled.
"""

from __future__ import annotations

import importlib.metadata
import os

import torch


def _probe_kernel():
    import triton
    import triton.language as tl

    @triton.jit
    def loop_to_n(out_ptr, n):
        total = 0
        for i in range(0, n):
            total += i
        tl.store(out_ptr, total)

    return loop_to_n


def interpreter_refusal() -> str | None:
    """None when the interpreter runs the probe kernel right (or is not in use), else why sarkern[triton] is refused."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return None
    try:
        kernel = _probe_kernel()
        out = torch.zeros(1, dtype=torch.int32)
        kernel[(1,)](out, 4)
    except Exception as error:
        versions = {d: importlib.metadata.version(d) for d in ("triton", "numpy")}
        return (
            f"Triton {versions['triton']}'s interpreter cannot run a loop over a runtime bound with numpy "
            f"{versions['numpy']} ({type(error).__name__}: {str(error)[:160]}); the tiny run needs numpy<2.4 with "
            f"this Triton, or a Triton whose interpreter runs it (3.9 does)"
        )
    if int(out) != 6:
        return f"Triton's interpreter computed {int(out)} for 0+1+2+3 in the probe kernel"
    return None
