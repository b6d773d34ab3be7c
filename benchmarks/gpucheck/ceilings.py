"""Section 3: the ceilings the ops are judged against, HBM bandwidth and bare cuBLAS GEMMs of section 4's shape."""

from __future__ import annotations

import torch

from .report import Run
from .timing import nbytes


def ceilings(run: Run) -> None:
    device, settings = run.device, run.settings
    dtype = getattr(torch, settings.dtype)
    result: dict = {}
    run.data["ceilings"] = result

    def warm_median_ms(fn):
        fn()
        return device.median_ms(fn, settings.rep_ms)

    def bandwidth():
        count = settings.copy_bytes // 2
        src = torch.randn(count, device=device.torch_device, dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        copy_ms = warm_median_ms(lambda: dst.copy_(src))
        read_ms = warm_median_ms(lambda: src.sum(dtype=torch.float32))
        copy_rate, read_rate = 2 * nbytes(src) / copy_ms / 1e6, nbytes(src) / read_ms / 1e6  # copy: read + written
        return {
            "bytes": nbytes(src),
            "copy_ms": copy_ms,
            "copy_GBps": copy_rate,
            "read_ms": read_ms,
            "read_GBps": read_rate,
            # The conservative read ceiling: the better of a read-only reduction and a copy.
            "read_ceiling_GBps": max(copy_rate, read_rate),
        }

    result["hbm"] = run.measure("HBM bandwidth", bandwidth)

    def gemms():
        n, d, v = settings.linear
        g = torch.Generator(device=device.torch_device).manual_seed(7)
        hidden = torch.randn(n, d, device=device.torch_device, generator=g).to(dtype)
        weight = (torch.randn(v, d, device=device.torch_device, generator=g) * d**-0.5).to(dtype)
        grad_logits = torch.randn(n, v, device=device.torch_device, generator=g).to(dtype)
        logits = torch.empty(n, v, device=device.torch_device, dtype=dtype)
        grad_hidden, grad_weight = torch.empty_like(hidden), torch.empty_like(weight)
        times = {
            "forward_ms": warm_median_ms(lambda: torch.mm(hidden, weight.T, out=logits)),
            "grad_hidden_ms": warm_median_ms(lambda: torch.mm(grad_logits, weight, out=grad_hidden)),
            "grad_weight_ms": device.median_ms(
                lambda: torch.mm(grad_logits.T, hidden, out=grad_weight), settings.rep_ms
            ),
        }
        flop = 2 * n * d * v
        return {
            **times,
            "three_ms": sum(times.values()),
            "flop_per_gemm": flop,
            "forward_TFLOPs": flop / times["forward_ms"] / 1e9,
            "shape": {"N": n, "D": d, "V": v, "dtype": settings.dtype},
        }

    result["gemm"] = run.measure("cuBLAS GEMMs", gemms)
