"""Time limits, timing and peak memory on CUDA and the CPU, and how a failed measurement is reported."""

from __future__ import annotations

import contextlib
import gc
import os
import signal
import statistics
import time
import traceback
from collections.abc import Callable

import torch


class Unavailable(Exception):
    """Cannot run here (missing package, CPU-only machine, ...): reported with the reason, never a failure."""


class BudgetExceeded(Exception):
    """A section ran out of its time budget."""


@contextlib.contextmanager
def time_limit(seconds: float):
    """Raise BudgetExceeded in this (main) thread after `seconds`; Python code (autotuning, launch loops) stops.

    Nests: an enclosing limit keeps running (the inner one is capped by it and re-arms it on exit)."""
    if seconds <= 0:
        raise BudgetExceeded("no time left in this section's budget")

    def expire(_signum, _frame):
        raise BudgetExceeded(f"stopped after the section's remaining {seconds:.0f} s")

    outer_left, _ = signal.getitimer(signal.ITIMER_REAL)
    previous = signal.signal(signal.SIGALRM, expire)
    start = time.monotonic()
    signal.setitimer(signal.ITIMER_REAL, min(seconds, outer_left) if outer_left else seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_left:
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - start), 1e-3))


class Device:
    """Timing and peak memory with one interface on CUDA (events, the caching allocator) and the CPU."""

    def __init__(self, name: str):
        self.torch_device = torch.device(name)
        self.cuda = self.torch_device.type == "cuda"

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def free(self) -> None:
        """Release cached memory between measurements; never raises (a broken CUDA context is reported where it
        broke, and the section's process ends with it)."""
        gc.collect()
        if self.cuda:
            try:
                torch.cuda.synchronize()
                torch.cuda.empty_cache()
            except Exception as error:
                print(f"   (freeing CUDA memory failed: {type(error).__name__}: {error})", flush=True)

    def median_ms(self, fn: Callable[[], object], rep_ms: float) -> float:
        """Median time of one call after the caller's warm-up (compilation, autotuning, workspaces)."""
        return self.quantiles_ms(fn, rep_ms)[1]

    def quantiles_ms(self, fn: Callable[[], object], rep_ms: float) -> tuple[float, float, float]:
        """20th, 50th and 80th percentile times of one call after the caller's warm-up: the median, and a spread
        to tell a candidate's gain from noise."""
        if self.cuda:
            import triton.testing

            q = triton.testing.do_bench(fn, warmup=max(25, rep_ms / 4), rep=rep_ms, quantiles=[0.2, 0.5, 0.8])
            return tuple(float(t) for t in q)
        times, spent = [], 0.0  # the caller warmed up
        while not times or (spent < rep_ms and len(times) < 50):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
            spent += times[-1]
        if len(times) < 2:
            return times[0], times[0], times[0]
        deciles = statistics.quantiles(times, n=10, method="inclusive")
        return deciles[1], statistics.median(times), deciles[7]

    def timed_calls(self, fn: Callable[[], object], reps: int) -> tuple[list[float], int]:
        """Times (ms) of `reps` calls after the caller's warm-up, and the peak memory of those calls beyond what
        was allocated before them. For calls of seconds (the scorer), where do_bench's many rounds cost too much."""
        if not self.cuda:
            from memory import cpu_extra_peak_bytes

            times: list[float] = []

            def timed():
                start = time.perf_counter()
                fn()
                times.append((time.perf_counter() - start) * 1e3)

            peak = cpu_extra_peak_bytes(timed, warmup=False)
            for _ in range(reps - 1):
                timed()
            return times, peak
        self.free()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        times = []
        for _ in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        return times, torch.cuda.max_memory_allocated() - base

    def peak_bytes(self, fn: Callable[[], object]) -> int:
        """Peak memory of one call beyond what was allocated before it (its output is counted: it is allocated)."""
        if not self.cuda:
            from memory import cpu_extra_peak_bytes

            return cpu_extra_peak_bytes(fn, warmup=False)
        self.free()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        out = fn()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        del out
        return peak


@contextlib.contextmanager
def env_vars(values: dict[str, str]):
    """`values` set in the environment for the duration, then each variable restored (or removed again); sarkern
    reads its variables per call."""
    before = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def sarkern_backend(name: str):
    """Run sarkern's ops under SARKERN_BACKEND=name."""
    return env_vars({"SARKERN_BACKEND": name})


def ratio(value: float, reference: float) -> float | None:
    """value / reference, None where the reference is 0 (a peak below what the CPU's resident-set counter sees)."""
    return value / reference if reference > 0 else None


def nbytes(*tensors: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def outcome_of(error: BaseException) -> dict:
    """How a failed measurement is reported: unavailable, out of memory, over budget, or an error."""
    if isinstance(error, Unavailable) or type(error).__name__ == "Unavailable":
        return {"status": "unavailable", "reason": str(error)}
    if isinstance(error, BudgetExceeded):
        return {"status": "skipped", "reason": str(error)}
    if isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower():
        return {"status": "oom", "reason": str(error).splitlines()[0][:300]}
    tail = traceback.format_exception(type(error), error, error.__traceback__)[-3:]
    return {"status": "error", "reason": f"{type(error).__name__}: {error}"[:500], "traceback": "".join(tail)[-2000:]}
