"""`make gpu-check`: everything GPU-side in one run of at most 8 minutes (DESIGN.md sections 4 and 6).

In order, each section in its own process and time budget (a hung kernel is killed, a broken CUDA context ends with
its section), a failure in one recorded and the next one run:
1. the device and versions (torch, Triton, driver, sarkern's commit and source digest, the peers);
2. `tests/test_gpu_*.py` through pytest (a subprocess with a hard timeout; pass/fail per test recorded);
3. the two ceilings: HBM bandwidth (a large device-to-device copy, bytes read + written, and a read-only
   reduction) and bare cuBLAS GEMMs of section 4's shape (the logits GEMM and the two gradient GEMMs);
4. `linear_token_logprobs` forward (no grad) and forward + backward, `token_logprobs` from existing logits and
   `sequence_perplexity`, each against the ceilings and the peers (`contenders.py`: TRL's chunked log-prob,
   Liger-Kernel FLCE and fused scaled CE, Cut Cross-Entropy, torch `linear_cross_entropy`, naive PyTorch),
   peak memory beside every time; every sarkern result checked once against a float64 reference;
5. the SAR scorer at the Qwen3-1.7B shape (96 completions) with each attention backend against the paper's way;
6. section 4's targets, each marked met or missed with its ratio.

Writes `<out>/<device>-<date>.json` and `.md` after every section (a run stopped midway leaves what it measured)
and the tests' log and JUnit XML beside them. `--tiny` runs the same code on the CPU at tiny shapes, sarkern's
Triton kernels under Triton's interpreter (`TRITON_INTERPRET=1`) and its chunked PyTorch path; the test suite runs
it that way (`tests/test_gpu_check_script.py`), so the script cannot rot between GPU windows.

Timing: `triton.testing.do_bench` medians on CUDA (warm-up excluded; it clears the L2 cache before every timed
call, so inputs that would fit in L2 are not served from it), a median of `perf_counter` rounds on the CPU; the
scorer (seconds per call) is timed over a few calls with CUDA events. Peak memory: the CUDA allocator's peak beyond
what was allocated before the call (inputs, model); on the CPU the peak resident set of the call (`memory.py`).
"""

from __future__ import annotations

import sys

if "--tiny" in sys.argv:
    import os

    # Triton picks its interpreter when a kernel is defined: before sarkern's kernels are first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse
import contextlib
import datetime as dt
import gc
import glob
import hashlib
import importlib.metadata
import importlib.util
import inspect
import json
import math
import os
import platform
import re
import shutil
import signal
import statistics
import subprocess
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

MiB = 2**20
PEERS = ("trl", "liger-kernel", "cut-cross-entropy", "transformers", "accelerate", "datasets", "flash-attn")


# ------------------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Settings:
    name: str
    device: str
    dtype: str
    linear: tuple[int, int, int]  # N tokens, D hidden, V vocabulary (section 4)
    logits: tuple[int, int]  # N tokens, V vocabulary
    segments: int  # sequence_perplexity: N tokens split into this many segments
    copy_bytes: int  # HBM ceiling: bytes of the copied tensor
    rep_ms: float  # do_bench's time budget per contender (CUDA); CPU: at least 3 rounds within it
    scorer_reps: int  # timed scorer calls per contender (at most; fewer when the budget is short)
    paper_micro_batch: int  # the paper's way scores this many completions per padded forward
    budgets: dict[str, float]  # seconds per section
    total_s: float  # the whole run
    backends: tuple[str, ...]  # SARKERN_BACKEND values the sarkern contenders run under


FULL = Settings(
    name="full",
    device="cuda",
    dtype="bfloat16",
    linear=(16384, 4096, 151936),
    logits=(16384, 151936),
    segments=8,
    copy_bytes=2 * 2**30,
    rep_ms=600.0,
    scorer_reps=3,
    # The whole batch at once would need 96 x 2304 x 151936 bf16 logits (67 GB) and their fp32 log-softmax.
    paper_micro_batch=8,
    budgets={
        "environment": 20,
        "tests": 100,
        "ceilings": 25,
        "linear": 110,
        "logits": 35,
        "sequence_perplexity": 15,
        "scorer": 150,
    },
    # 8 minutes less the wheels' install, imports and start-up.
    total_s=440,
    backends=("auto",),
)
TINY = Settings(
    name="tiny",
    device="cpu",
    dtype="float32",
    linear=(32, 16, 300),  # V not a multiple of the kernels' vocabulary block: the masked tail runs
    logits=(16, 300),
    segments=4,
    copy_bytes=8 * MiB,
    rep_ms=20.0,
    scorer_reps=2,
    paper_micro_batch=2,
    budgets={
        "environment": 20,
        "tests": 60,
        "ceilings": 10,
        "linear": 60,
        "logits": 40,
        "sequence_perplexity": 15,
        "scorer": 40,
    },
    total_s=240,
    backends=("triton", "torch"),
)


def scorer_shape(settings: Settings):
    from bench_scorer import CUDA_SHAPE, ScorerShape

    if settings.name == "full":
        return CUDA_SHAPE  # Qwen3-1.7B-shaped, 16 prompts x 6 completions, prompt 256, completions 2048
    return ScorerShape("tiny", 2, 64, 4, 2, 16, 128, 1000, 2, 2, 8, 8, 16, "float32")


def tolerances(dtype: torch.dtype) -> dict[str, float]:
    """DESIGN.md section 5, against float64: per-token log-probs (absolute), per-sequence perplexity (relative).

    Gradients: relative Frobenius error. fp32 keeps DESIGN's 1e-5; bf16 takes the 2e-2 that tests/test_gpu_kernels.py
    allows bf16 gradients (relative to their scale). Rounding alone costs about 2^-9 per rounding of the logit
    gradients and of the outputs, so a bf16 weight gradient accumulated in bf16 over many token chunks shows here
    as an error several times 2^-9: the number is reported, not only the verdict. The scorer compares two results
    of the same dtype, each within the per-token bound of float64, so twice that bound on mean NLLs.
    """
    if dtype == torch.float32:
        return {"logprob_abs": 1e-5, "ppl_rel": 1e-5, "grad_rel": 1e-5, "scorer_nll": 2e-5}
    return {"logprob_abs": 2e-2, "ppl_rel": 1e-3, "grad_rel": 2e-2, "scorer_nll": 4e-2}


# ------------------------------------------------------------------------------------------ timing, memory


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
        if self.cuda:
            import triton.testing

            return float(triton.testing.do_bench(fn, warmup=max(25, rep_ms / 4), rep=rep_ms, return_mode="median"))
        times, spent = [], 0.0  # the caller warmed up
        while not times or (spent < rep_ms and len(times) < 50):
            start = time.perf_counter()
            fn()
            times.append((time.perf_counter() - start) * 1e3)
            spent += times[-1]
        return statistics.median(times)

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
def env_var(name: str, value: str | None):
    """`name=value` in the environment for the duration (None: unchanged); sarkern reads its variables per call."""
    if value is None:
        yield
        return
    before = os.environ.get(name)
    os.environ[name] = value
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def sarkern_backend(name: str):
    """Run sarkern's ops under SARKERN_BACKEND=name."""
    return env_var("SARKERN_BACKEND", name)


def _ratio(value: float, reference: float) -> float | None:
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


# -------------------------------------------------------------------------------------------- the report


@dataclass
class Run:
    settings: Settings
    device: Device
    out: Path
    tag: str
    started: float = field(default_factory=time.monotonic)
    data: dict = field(default_factory=dict)
    section_started: float = 0.0
    section_budget: float = 0.0
    child: bool = False  # a section's own process (see run_section_process): the parent owns the wall time

    def remaining(self) -> float:
        """Seconds left in the current section, capped by what is left of the whole run."""
        now = time.monotonic()
        return min(self.section_budget - (now - self.section_started), self.settings.total_s - (now - self.started))

    @contextlib.contextmanager
    def section(self, name: str):
        self.section_started, self.section_budget = time.monotonic(), self.settings.budgets[name]
        record = {"status": "running", "budget_s": self.section_budget}
        self.data.setdefault("sections", {})[name] = record
        print(f"\n== {name} (budget {self.section_budget:.0f} s)", flush=True)
        try:
            with time_limit(self.remaining()):
                yield
            record["status"] = "ok"
        except Exception as error:  # one failing section never loses the others
            record.update(outcome_of(error))
            if record["status"] == "error":
                record["status"] = "failed"
            print(f"   section {name}: {record['status']}: {record.get('reason')}", flush=True)
        finally:
            record["seconds"] = round(time.monotonic() - self.section_started, 2)
            self.device.free()
            self.write()

    def measure(self, what: str, fn: Callable[[], dict]) -> dict:
        """One measurement inside the section's remaining budget; its failure becomes its row's status.

        The report is written first, so a section process killed in this measurement leaves the ones before it."""
        self.write()
        try:
            with time_limit(self.remaining()):
                row = {"status": "ok", **fn()}
        except Exception as error:
            row = outcome_of(error)
        finally:
            self.device.free()
        shown = {k: v for k, v in row.items() if k in ("status", "median_ms", "peak_extra_mib", "reason", "check")}
        print(f"   {what}: {json.dumps(shown, default=str)[:400]}", flush=True)
        return row

    def write(self) -> None:
        """The JSON, then the markdown rendered from it; never raises (a rendering bug must not cost the data)."""
        if not self.child:
            self.data["wall_s"] = round(time.monotonic() - self.started, 1)
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            self.data["targets"] = evaluate_targets(self.data, self.settings)
        except Exception as error:
            note = outcome_of(error)["reason"]
            self.data["targets"] = [
                {
                    "what": "(evaluating the targets)",
                    "limit": None,
                    "better": "lower",
                    "ratio": None,
                    "status": "error",
                    "note": note,
                }
            ]
        _write_atomic(self.out / f"{self.tag}.json", json.dumps(self.data, indent=2, default=str) + "\n")
        try:
            text = render(self)
        except Exception as error:
            text = f"# gpu-check: {self.tag}\n\nRendering failed ({outcome_of(error)['reason']}); see the .json.\n"
        _write_atomic(self.out / f"{self.tag}.md", text)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


# --------------------------------------------------------------------------------------- 1. environment


def _command(*args: str) -> str | None:
    if shutil.which(args[0]) is None:
        return None
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def source_digest() -> str:
    """sha256 over sarkern's and the kernels' sources: names the code measured where the copy has no .git."""
    h = hashlib.sha256()
    for path in sorted([*ROOT.glob("sarkern/**/*.py"), *ROOT.glob("kernels/**/*.py")]):
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(run: Run) -> None:
    import sarkern

    device = run.device
    machine = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count()}
    if device.cuda:
        props = torch.cuda.get_device_properties(device.torch_device)
        machine.update(
            gpu=props.name,
            compute_capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            l2_mib=round(getattr(props, "L2_cache_size", 0) / MiB, 1),
            cuda=torch.version.cuda,
            driver=_command("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
            clocks=_command(
                "nvidia-smi",
                "--query-gpu=clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit",
                "--format=csv",
            ),
        )
    else:
        machine.update(gpu=None, torch_threads=torch.get_num_threads())
    commit = _command("git", "-C", str(ROOT), "rev-parse", "HEAD")
    dirty = _command("git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no")
    run.data["machine"] = machine
    run.data["versions"] = {
        "torch": torch.__version__,
        "triton": _version("triton"),
        **{peer: _version(peer) for peer in PEERS},
        "torch_linear_cross_entropy": hasattr(torch.nn.functional, "linear_cross_entropy"),
    }
    run.data["sarkern"] = {
        "version": sarkern.__version__,
        "commit": commit or "unknown (no git checkout here)",
        "dirty": bool(dirty) if commit else None,
        "source_digest": source_digest(),
        "imported_from": str(Path(sarkern.__file__).parent),
        "check_inputs": "check_inputs" in inspect.signature(sarkern.linear_token_logprobs).parameters,
        "backends": list(run.settings.backends),
    }
    run.data["primary_sarkern"] = primary_sarkern(run)
    for key in ("machine", "versions", "sarkern"):
        print(f"   {key}: {json.dumps(run.data[key], default=str)}", flush=True)


# --------------------------------------------------------------------------------------------- 2. tests


def run_gpu_tests(run: Run) -> None:
    """pytest on tests/test_gpu_*.py in a subprocess (its own process group, killed whole at the budget's end)."""
    files = sorted(glob.glob(str(ROOT / "tests" / "test_gpu_*.py")))
    junit = run.out / f"{run.tag}.tests.junit.xml"
    log = run.out / f"{run.tag}.tests.log"
    cmd = [sys.executable, "-m", "pytest", *files, "-o", "addopts=", "-v", "-rfEs", "-p", "no:cacheprovider"]
    cmd.append(f"--junitxml={junit}")
    paths = [*sys_path_additions, os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    env.pop("SARKERN_BACKEND", None)
    timeout = max(1.0, run.remaining() - 5)
    record: dict = {"command": " ".join(cmd[1:]), "files": [Path(f).name for f in files]}
    run.data["tests"] = record
    start = time.monotonic()
    with open(log, "w") as sink:
        process = subprocess.Popen(
            cmd, cwd=ROOT, env=env, stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            record["exit_code"] = process.wait(timeout=timeout)
        except BaseException:  # over the budget (or interrupted): stop pytest and whatever it started
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            record["exit_code"] = None
            record["timed_out_after_s"] = round(time.monotonic() - start)
    record["seconds"] = round(time.monotonic() - start, 1)
    text = log.read_text(errors="replace")
    record.update(_junit_summary(junit) if junit.exists() else _log_summary(text))
    record["log_tail"] = text[-3000:]
    print(f"   tests: { {k: record.get(k) for k in ('passed', 'failed', 'errors', 'skipped', 'exit_code')} }")
    if record.get("timed_out_after_s") is not None:
        raise BudgetExceeded(f"pytest stopped after {record['timed_out_after_s']} s; outcomes so far from its log")


def _junit_summary(path: Path) -> dict:
    counts = {"passed": 0, "failed": 0, "errors": 0, "skipped": 0}
    failures, skips = [], set()
    for case in ET.parse(path).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        failure, error, skipped = case.find("failure"), case.find("error"), case.find("skipped")
        if failure is not None or error is not None:
            node = failure if failure is not None else error
            counts["failed" if failure is not None else "errors"] += 1
            first_line = ((node.get("message") or "").strip().splitlines() or [""])[0]
            failures.append(f"{name}: {first_line[:200]}")
        elif skipped is not None:
            counts["skipped"] += 1
            skips.add(skipped.get("message", "")[:200])
        else:
            counts["passed"] += 1
    return {**counts, "failures": failures, "skip_reasons": sorted(skips)}


def _log_summary(text: str) -> dict:
    """Outcomes from pytest's verbose lines, for a run stopped before it wrote its JUnit report."""
    outcomes = dict(re.findall(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR)", text, flags=re.M))
    counts = {
        key: sum(1 for o in outcomes.values() if o == word)
        for key, word in (("passed", "PASSED"), ("failed", "FAILED"), ("errors", "ERROR"), ("skipped", "SKIPPED"))
    }
    failures = [f"{name}: {o}" for name, o in outcomes.items() if o in ("FAILED", "ERROR")]
    return {**counts, "failures": failures, "skip_reasons": [], "unfinished": True}


# ------------------------------------------------------------------------------------------- 3. ceilings


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


# ------------------------------------------------------------------------------------------------ 4. ops


def sarkern_variants(run: Run) -> dict[str, tuple[str, dict]]:
    """contender key -> (SARKERN_BACKEND, extra keyword arguments), one per backend, with and without the input
    check where the ops have `check_inputs` (the trainer and scorer validate on the CPU and skip it)."""
    variants = {}
    for backend in run.settings.backends:
        key = "sarkern" if backend == "auto" else f"sarkern[{backend}]"
        variants[key] = (backend, {})
        if run.data.get("sarkern", {}).get("check_inputs"):
            variants[f"{key}, check_inputs=False"] = (backend, {"check_inputs": False})
    return variants


def primary_sarkern(run: Run) -> str:
    """The sarkern contender section 4's targets are judged on: the first backend, unchecked where possible."""
    keys = list(sarkern_variants(run))
    unchecked = [k for k in keys if "check_inputs=False" in k]
    return unchecked[0] if unchecked else keys[0]


def tile_candidates(run: Run) -> dict[str, tuple[str, dict]]:
    """The primary sarkern variant again with each candidate forward tile of `sarkern.kernels.linear_logprobs`
    (FORWARD_CANDIDATES_16), forced through SARKERN_FORWARD_BLOCKS: what the next change of the default would be."""
    try:
        from sarkern.kernels.linear_logprobs import FORWARD_CANDIDATES_16
    except ImportError:  # a sarkern without candidates
        return {}
    backend, kwargs = sarkern_variants(run)[primary_sarkern(run)]
    out = {}
    for b in FORWARD_CANDIDATES_16:
        spec = f"{b.block_n},{b.block_v},{b.block_d},{b.num_warps},{b.num_stages}"
        key = f"{primary_sarkern(run)}, tile {b.block_n}x{b.block_v}x{b.block_d} w{b.num_warps} s{b.num_stages}"
        out[key] = (backend, {**kwargs, "forward_blocks": spec})
    return out


def _sarkern_runner(op: str, backend: str, kwargs: dict, inputs, backward: bool):
    import contenders

    import sarkern

    kwargs = dict(kwargs)
    blocks = kwargs.pop("forward_blocks", None)

    def compute(x):
        with sarkern_backend(backend), env_var("SARKERN_FORWARD_BLOCKS", blocks):
            if op == "linear":
                return sarkern.linear_token_logprobs(x.hidden, x.weight, x.targets, **kwargs)
            return sarkern.token_logprobs(x.logits, x.targets, **kwargs)

    return contenders.runner(compute, inputs, backward)


def _reference_forward(family: str, inputs, chunk: int = 1024) -> torch.Tensor:
    """float64 log-probs of every token, a chunk of rows at a time (the [N, V] float64 logits never exist whole)."""
    from sarkern import reference

    weight = inputs.weight.detach().double() if family == "linear" else None
    parts = []
    for i in range(0, inputs.targets.shape[0], chunk):
        rows = slice(i, i + chunk)
        if family == "linear":
            parts.append(
                reference.linear_token_logprobs(inputs.hidden[rows].detach().double(), weight, inputs.targets[rows])
            )
        else:
            parts.append(reference.token_logprobs(inputs.logits[rows].detach().double(), inputs.targets[rows]))
    return torch.cat(parts)


def _reference_grads(family: str, inputs, chunk: int = 1024) -> list[torch.Tensor]:
    """float64 gradients of the summed log-probs w.r.t. the inputs, chunk by chunk (autograd accumulates the
    LM head's gradient across chunks)."""
    from sarkern import reference

    if family == "linear":
        weight = inputs.weight.detach().double().requires_grad_(True)
        grad_hidden = []
        for i in range(0, inputs.targets.shape[0], chunk):
            rows = slice(i, i + chunk)
            hidden = inputs.hidden[rows].detach().double().requires_grad_(True)
            reference.linear_token_logprobs(hidden, weight, inputs.targets[rows]).sum().backward()
            grad_hidden.append(hidden.grad.float())
        return [torch.cat(grad_hidden), weight.grad.float()]
    grads = []
    for i in range(0, inputs.targets.shape[0], chunk):
        logits = inputs.logits[i : i + chunk].detach().double().requires_grad_(True)
        reference.token_logprobs(logits, inputs.targets[i : i + chunk]).sum().backward()
        grads.append(logits.grad.float())
    return [torch.cat(grads)]


def _rel_error(actual: torch.Tensor, expected: torch.Tensor, chunk: int = 1024) -> float:
    """||actual - expected|| / ||expected|| (Frobenius), a chunk of rows at a time: a [N, V] logits gradient is
    gigabytes, and whole-tensor temporaries would not fit beside the inputs."""
    err = norm = 0.0
    for i in range(0, actual.shape[0], chunk):
        a, e = actual[i : i + chunk].double(), expected[i : i + chunk].double()
        err += float(torch.sum((a - e) ** 2))
        norm += float(torch.sum(e**2))
    return math.sqrt(err / norm) if norm > 0 else (0.0 if err == 0 else math.inf)


def time_op_family(run: Run, family: str) -> None:
    """Every contender of `family` (`linear` or `logits`) forward and forward + backward at section 4's shape."""
    settings = run.settings
    dtype = getattr(torch, settings.dtype)
    if family == "linear":
        n, d, v = settings.linear
    else:
        (n, v), d = settings.logits, 0
    result: dict = {"shape": {"N": n, "D": d, "V": v, "dtype": settings.dtype}, "tolerances": tolerances(dtype)}
    run.data.setdefault("ops", {})[family] = result
    for mode in ("forward", "forward_backward"):
        result[mode] = _time_mode(run, family, mode == "forward_backward", (n, d, v), dtype, result)
        _ratios(run, family, mode, result[mode])


def _time_mode(run: Run, family: str, backward: bool, shape, dtype, result: dict) -> dict[str, dict]:
    import contenders

    settings, device = run.settings, run.device
    mode = "forward_backward" if backward else "forward"
    variants = sarkern_variants(run)
    if family == "linear" and not backward:
        variants.update(tile_candidates(run))
    peers = {k: f for k, f in contenders.FAMILIES[family].items() if k != "sarkern"}
    inputs = contenders.make_inputs(
        family, *shape, dtype, settings.device, backward, seed=11, generate_on_device=device.cuda
    )
    # The float64 reference, once per mode: log-probs (forward) or gradients (forward + backward).
    reference = run.measure(
        f"{family} {mode} float64 reference",
        lambda: {"values": _reference_grads(family, inputs) if backward else _reference_forward(family, inputs)},
    )
    expected = reference.pop("values", None)
    result.setdefault("reference", {})[mode] = reference
    tol = result["tolerances"]
    rows: dict[str, dict] = {}
    outputs: dict[str, torch.Tensor] = {}
    primary = primary_sarkern(run)

    def clear_grads():
        for leaf in inputs.leaves():
            leaf.grad = None

    def measure(key: str) -> dict:
        if key in variants:
            backend, kwargs = variants[key]
            fn = _sarkern_runner(family, backend, kwargs, inputs, backward)
        else:
            fn = peers[key](inputs, backward)
        out = fn()  # warm-up: compilation, autotuning
        device.sync()
        check = _check(key in variants, backward, out, inputs, expected, outputs.get(primary), tol)
        outputs[key] = out.detach()
        del out
        clear_grads()
        peak = device.peak_bytes(fn)
        clear_grads()
        allowed = nbytes(outputs[key]) + (nbytes(*inputs.leaves()) if backward else 0)
        median = device.median_ms(fn, settings.rep_ms)
        clear_grads()
        return {
            "check": check,
            "median_ms": median,
            "peak_extra_mib": peak / MiB,
            "extra_beyond_outputs_mib": (peak - allowed) / MiB,
        }

    for key in [*variants, *peers]:
        rows[key] = run.measure(f"{family} {mode} {key}", lambda key=key: measure(key))
        if key != primary:
            outputs.pop(key, None)
    return rows


def _check(is_sarkern, backward, out, inputs, expected, sarkern_out, tol) -> dict:
    """sarkern: against the float64 reference (log-probs, or gradients after backward). Peers: their forward
    output against sarkern's (a peer computing something else shows here)."""
    if not is_sarkern:
        if backward or sarkern_out is None or out.shape != sarkern_out.shape:
            return {}
        return {"max_abs_diff_vs_sarkern": float((out.detach().float() - sarkern_out.float()).abs().max())}
    if expected is None:
        return {"ok": None, "note": "no reference (its computation failed)"}
    if not backward:
        err = float((out.detach().double() - expected).abs().max())
        return {"max_abs_error": err, "bound": tol["logprob_abs"], "ok": bool(err <= tol["logprob_abs"])}
    grads = [leaf.grad for leaf in inputs.leaves()]
    if any(g is None for g in grads):
        return {"ok": False, "note": "a gradient is missing"}
    errors = [_rel_error(g, e) for g, e in zip(grads, expected)]
    worst = max(errors)
    return {"grad_rel_errors": errors, "bound": tol["grad_rel"], "ok": bool(worst <= tol["grad_rel"])}


def _ratios(run: Run, family: str, mode: str, rows: dict) -> None:
    """Each row's time against the ceiling of its family and mode, and against the primary sarkern contender."""
    ceil = run.data.get("ceilings", {})
    gemm, hbm = ceil.get("gemm", {}), ceil.get("hbm", {})
    floor_ms = None
    if family == "linear" and gemm.get("status") == "ok":
        floor_ms = gemm["three_ms"] if mode == "forward_backward" else gemm["forward_ms"]
    if family == "logits" and hbm.get("status") == "ok":
        n, v = run.settings.logits
        itemsize = torch.tensor([], dtype=getattr(torch, run.settings.dtype)).element_size()
        bytes_moved = n * v * itemsize * (2 if mode == "forward_backward" else 1)  # logits read (+ grad written)
        floor_ms = bytes_moved / (hbm["read_ceiling_GBps"] * 1e6)
    ours = rows.get(primary_sarkern(run), {})
    for row in rows.values():
        if row.get("status") != "ok":
            continue
        if floor_ms:
            row["x_ceiling"] = row["median_ms"] / floor_ms
        if ours.get("status") == "ok":
            row["x_sarkern_time"] = row["median_ms"] / ours["median_ms"]
            row["x_sarkern_memory"] = _ratio(row["peak_extra_mib"], ours["peak_extra_mib"])
    rows_meta = run.data["ops"][family].setdefault("ceiling_ms", {})
    rows_meta[mode] = floor_ms


def time_sequence_perplexity(run: Run) -> None:
    """sequence_perplexity forward (the scorer's op) at section 4's shape: N tokens in equal segments."""
    import sarkern

    settings, device = run.settings, run.device
    dtype = getattr(torch, settings.dtype)
    n, d, v = settings.linear
    import contenders

    inputs = contenders.make_inputs(
        "linear", n, d, v, dtype, settings.device, False, seed=5, generate_on_device=device.cuda
    )
    segment_ids = torch.arange(n, device=settings.device) * settings.segments // n
    rows: dict[str, dict] = {}
    result = {
        "shape": {"N": n, "D": d, "V": v, "segments": settings.segments, "dtype": settings.dtype},
        "forward": rows,
    }
    run.data.setdefault("ops", {})["sequence_perplexity"] = result
    reference = run.measure(
        "sequence_perplexity float64 reference", lambda: {"values": _reference_forward("linear", inputs)}
    )
    token_ref = reference.pop("values", None)
    expected = None
    if token_ref is not None:
        sums = torch.zeros(settings.segments, dtype=torch.float64, device=token_ref.device)
        sums.index_add_(0, segment_ids, token_ref)
        expected = torch.exp(-sums / torch.bincount(segment_ids, minlength=settings.segments))
    tol = tolerances(dtype)
    for key, (backend, kwargs) in sarkern_variants(run).items():

        def measure(backend=backend, kwargs=kwargs):
            def fn():
                with torch.no_grad(), sarkern_backend(backend):
                    return sarkern.sequence_perplexity(
                        inputs.hidden, inputs.weight, inputs.targets, segment_ids, settings.segments, **kwargs
                    )

            out = fn()
            check = {"ok": None}
            if expected is not None:
                err = float((out.double() / expected - 1).abs().max())
                check = {"max_rel_error": err, "bound": tol["ppl_rel"], "ok": bool(err <= tol["ppl_rel"])}
            return {
                "check": check,
                "peak_extra_mib": device.peak_bytes(fn) / MiB,
                "median_ms": device.median_ms(fn, settings.rep_ms),
            }

        rows[key] = run.measure(f"sequence_perplexity {key}", measure)
    linear_fwd = run.data.get("ops", {}).get("linear", {}).get("forward", {}).get(primary_sarkern(run), {})
    for row in rows.values():
        if row.get("status") == "ok" and linear_fwd.get("status") == "ok":
            row["x_linear_token_logprobs"] = row["median_ms"] / linear_fwd["median_ms"]


# --------------------------------------------------------------------------------------------- 5. scorer


SCORER_CONTENDERS = ("paper", "sarkern-flex", "sarkern-sdpa", "sarkern-flash")


def _scorer_unavailable(name: str, device: Device) -> str | None:
    from sarkern.attention import flash_attn_available

    if name == "sarkern-flex" and not device.cuda:
        return "flex is refused on CPU tensors (sarkern.attention; Inductor's CPU FlexAttention is not trusted)"
    if name == "sarkern-flash" and not (device.cuda and flash_attn_available()):
        return "flash-attn is not installed" if device.cuda else "flash-attn needs CUDA"
    return None


def time_scorer(run: Run) -> None:
    import bench_scorer

    from sarkern.attention import flash_attn_available

    settings, device = run.settings, run.device
    shape = scorer_shape(settings)
    model = bench_scorer.build_model(shape, settings.device)
    prompts, completions, placeholder = bench_scorer.make_batch(shape)
    auto = "flash" if device.cuda and flash_attn_available() else ("flex" if device.cuda else "sdpa")
    dtype = getattr(torch, shape.dtype)
    bound = tolerances(dtype)["scorer_nll"]
    rows: dict[str, dict] = {}
    run.data["scorer"] = {
        "shape": asdict(shape),
        "completion_tokens": sum(map(len, completions)),
        "paper_micro_batch": settings.paper_micro_batch,
        "auto_backend": auto,
        "nll_bound": bound,
        "contenders": rows,
    }
    outputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in SCORER_CONTENDERS:

        def measure(name=name):
            reason = _scorer_unavailable(name, device)
            if reason:
                raise Unavailable(reason)
            fn = bench_scorer.make_contender(
                name, model, prompts, completions, placeholder, paper_micro_batch=settings.paper_micro_batch
            )
            start = time.monotonic()
            out = fn()  # warm-up (FlexAttention compiles here)
            device.sync()
            warmup_s = time.monotonic() - start
            outputs[name] = tuple(t.detach().float().cpu() for t in out)
            del out
            # One timed call, then as many more as fit in half of what is left (the warm-up may have compiled).
            times, peak = device.timed_calls(fn, 1)
            more = min(settings.scorer_reps - 1, int(run.remaining() * 0.5 / max(times[0] / 1e3, 1e-3)))
            if more > 0:
                more_times, more_peak = device.timed_calls(fn, more)
                times, peak = times + more_times, max(peak, more_peak)
            return {
                "label": name,
                "warmup_s": warmup_s,
                "times_ms": times,
                "median_ms": statistics.median(times),
                "peak_extra_mib": peak / MiB,
                "check": _scorer_check(name, outputs, bound),
            }

        rows[name] = run.measure(f"scorer {name}", measure)
    paper = rows.get("paper", {})
    for row in rows.values():
        if row.get("status") == "ok" and paper.get("status") == "ok":
            row["x_paper_time"] = row["median_ms"] / paper["median_ms"]
            row["x_paper_memory"] = _ratio(row["peak_extra_mib"], paper["peak_extra_mib"])


def _scorer_check(name: str, outputs: dict, bound: float) -> dict:
    """Mean NLLs (log of the perplexities) of the scorer against the paper's way's."""
    if name == "paper" or "paper" not in outputs:
        return {}
    ours, paper = outputs[name], outputs["paper"]
    diff = max(float((a.double().log() - b.double().log()).abs().max()) for a, b in zip(ours, paper))
    return {"max_nll_diff_vs_paper": diff, "bound": bound, "ok": bool(diff <= bound)}


# -------------------------------------------------------------------------------------------- 6. targets


def evaluate_targets(data: dict, settings: Settings) -> list[dict]:
    """DESIGN.md section 4's GPU targets from what was measured; a tiny CPU run computes them but judges none."""
    ops, ceil = data.get("ops", {}), data.get("ceilings", {})
    primary = data.get("primary_sarkern")
    targets = []

    def add(what, limit, ratio, better="lower", note=""):
        if ratio is None:
            status = "not measured"
        elif settings.name != "full":
            status = "not judged (tiny CPU run)"
        else:
            status = "met" if (ratio <= limit if better == "lower" else ratio >= limit) else "missed"
        targets.append({"what": what, "limit": limit, "better": better, "ratio": ratio, "status": status, "note": note})

    def row(family, mode):
        r = ops.get(family, {}).get(mode, {}).get(primary or "", {})
        return r if r.get("status") == "ok" else {}

    gemm = ceil.get("gemm", {}) if ceil.get("gemm", {}).get("status") == "ok" else {}
    fwd, fwd_bwd = row("linear", "forward"), row("linear", "forward_backward")
    add(
        "linear_token_logprobs forward / cuBLAS logits GEMM",
        1.10,
        fwd["median_ms"] / gemm["forward_ms"] if fwd and gemm else None,
        note=f"{primary}",
    )
    add(
        "linear_token_logprobs forward+backward / three cuBLAS GEMMs",
        1.45,
        fwd_bwd["median_ms"] / gemm["three_ms"] if fwd_bwd and gemm else None,
        note=f"{primary}",
    )
    for mode, r in (("forward", fwd), ("forward+backward", fwd_bwd)):
        add(
            f"linear_token_logprobs {mode} extra memory (MiB beyond inputs, outputs, gradients)",
            64.0,
            r["extra_beyond_outputs_mib"] if r else None,
            note="absolute MiB, not a ratio",
        )
    logits_fwd = row("logits", "forward")
    hbm = ceil.get("hbm", {}) if ceil.get("hbm", {}).get("status") == "ok" else {}
    achieved = None
    if logits_fwd and hbm:
        n, v = settings.logits
        itemsize = torch.tensor([], dtype=getattr(torch, settings.dtype)).element_size()
        achieved = (n * v * itemsize / (logits_fwd["median_ms"] * 1e6)) / hbm["read_ceiling_GBps"]
    add("token_logprobs forward: logits read bandwidth / measured HBM read", 0.85, achieved, better="higher")
    scorer = data.get("scorer", {})
    auto = scorer.get("auto_backend")
    srow = scorer.get("contenders", {}).get(f"sarkern-{auto}", {})
    prow = scorer.get("contenders", {}).get("paper", {})
    both = srow.get("status") == "ok" and prow.get("status") == "ok"
    note = f"backend {auto} (what auto picks here); paper's way in micro-batches of {scorer.get('paper_micro_batch')}"
    add("SAR scoring time / paper's way", 0.5, srow.get("x_paper_time") if both else None, note=note)
    add("SAR scoring peak memory / paper's way", 0.2, srow.get("x_paper_memory") if both else None, note=note)
    add("SAR overhead in a GRPO step", 0.05, None, note="not measured by gpu-check (needs a training run)")
    return targets


# --------------------------------------------------------------------------------------------- rendering


def _fmt(value, digits=3) -> str:
    if value is None:
        return "-"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_fmt(v, digits) for v in value) + "]"
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.0f}"
    return str(value)


def _contender_table(rows: dict, ratio_keys: list[tuple[str, str]]) -> list[str]:
    import labels

    head = ["contender", "status", "median ms", "peak MiB", *[title for title, _ in ratio_keys], "check"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for key, row in rows.items():
        status = row.get("status", "?")
        if status == "unavailable" and "not installed" in row.get("reason", ""):
            status = "not installed"
        check = row.get("check") or {}
        if "ok" in check:
            detail = ", ".join(f"{k} {_fmt(v)}" for k, v in check.items() if k not in ("ok", "bound", "note"))
            verdict = {True: "ok", False: "FAILED"}.get(check["ok"], "?")
            check_text = f"{verdict} ({detail}; bound {_fmt(check.get('bound'))})"
        else:
            check_text = ", ".join(f"{k} {_fmt(v)}" for k, v in check.items())
        if status != "ok":
            check_text = row.get("reason", "")[:160].replace("|", "/").replace("\n", " ")
        cells = [
            key if key.startswith("sarkern") or key == "paper" else f"{key} ({labels.label(key)})",
            status,
            _fmt(row.get("median_ms")),
            _fmt(row.get("peak_extra_mib")),
            *[_fmt(row.get(k)) for _, k in ratio_keys],
            check_text,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _legend(data: dict) -> list[str]:
    """What each contender computes, in words (labels.py), for those that appear in this report."""
    import labels

    keys = []
    for family in ("linear", "logits"):
        for mode in ("forward", "forward_backward"):
            keys += list(data.get("ops", {}).get(family, {}).get(mode, {}))
    keys += list(data.get("scorer", {}).get("contenders", {}))
    lines = ["", "## Contenders", ""]
    for key in dict.fromkeys(keys):
        base = key.split("[")[0].split(",")[0]
        suffix = key[len(base) :].strip(", ")
        lines.append(f"- `{key}`: {labels.description(base)}" + (f" ({suffix})" if suffix else ""))
    return lines


def render(run: Run) -> str:
    data, settings = run.data, run.settings
    machine, versions, sk = data.get("machine", {}), data.get("versions", {}), data.get("sarkern", {})
    out = [f"# gpu-check: {run.tag}", ""]
    out.append(
        f"Mode `{settings.name}` on {machine.get('gpu') or 'CPU'}; wall time {data.get('wall_s')} s; "
        f"started {data.get('started_utc')}."
    )
    if settings.name != "full":
        out.append(
            "Tiny CPU shapes (sarkern under Triton's interpreter and its torch path): tests the script, "
            "measures nothing about a GPU."
        )
    out += ["", "## Machine and versions", ""]
    for key, value in machine.items():
        out.append(f"- {key}: {'-' if value is None else value}")
    for key, value in versions.items():
        out.append(f"- {key}: {'not installed' if value is None else value}")
    out.append(
        f"- sarkern {sk.get('version')}: commit {sk.get('commit')}{' (dirty)' if sk.get('dirty') else ''}, "
        f"source digest {sk.get('source_digest')} (`python benchmarks/gpu_check.py --source-digest` here), "
        f"check_inputs {'supported' if sk.get('check_inputs') else 'absent'}"
    )
    out += [
        "",
        "## DESIGN.md section 4 targets",
        "",
        "| target | limit | measured | status | note |",
        "|---|---|---|---|---|",
    ]
    for t in data.get("targets", []):
        limit = f"{'<=' if t['better'] == 'lower' else '>='} {t['limit']}"
        out.append(f"| {t['what']} | {limit} | {_fmt(t['ratio'])} | {t['status']} | {t['note']} |")
    out += [
        "",
        "## Sections",
        "",
        "Seconds inside the section; with its process's start-up (imports) in parentheses.",
        "",
    ]
    out += ["| section | status | seconds | budget | note |", "|---|---|---|---|---|"]
    for name, s in data.get("sections", {}).items():
        note = (s.get("reason") or "")[:200].replace("|", "/").replace("\n", " ")
        seconds = f"{s.get('seconds', '-')}" + (f" ({s['process_seconds']})" if "process_seconds" in s else "")
        out.append(f"| {name} | {s['status']} | {seconds} | {s['budget_s']:.0f} | {note} |")
    tests = data.get("tests")
    if tests:
        out += ["", "## GPU tests", ""]
        out.append(
            f"`{tests.get('command')}`: {tests.get('passed')} passed, {tests.get('failed')} failed, "
            f"{tests.get('errors')} errors, {tests.get('skipped')} skipped in {tests.get('seconds')} s "
            f"(exit {tests.get('exit_code')})."
        )
        out += [f"- FAILED {f}" for f in tests.get("failures", [])]
        out += [f"- skipped: {s}" for s in tests.get("skip_reasons", [])]
    ceil = data.get("ceilings", {})
    if ceil:
        hbm, gemm = ceil.get("hbm", {}), ceil.get("gemm", {})
        out += ["", "## Ceilings", ""]
        if hbm.get("status") == "ok":
            out.append(
                f"- HBM: copy {_fmt(hbm['copy_GBps'], 4)} GB/s (read + written, {hbm['bytes'] / 2**30:.2f} GiB "
                f"copied), read {_fmt(hbm['read_GBps'], 4)} GB/s (a sum); "
                f"read ceiling {_fmt(hbm['read_ceiling_GBps'], 4)} GB/s"
            )
        else:
            out.append(f"- HBM: {hbm.get('status')}: {hbm.get('reason')}")
        if gemm.get("status") == "ok":
            out.append(
                f"- cuBLAS GEMMs at N={gemm['shape']['N']}, D={gemm['shape']['D']}, V={gemm['shape']['V']} "
                f"{gemm['shape']['dtype']}: logits {_fmt(gemm['forward_ms'])} ms "
                f"({_fmt(gemm['forward_TFLOPs'], 4)} TFLOP/s), grad hidden {_fmt(gemm['grad_hidden_ms'])} ms, "
                f"grad weight {_fmt(gemm['grad_weight_ms'])} ms, three {_fmt(gemm['three_ms'])} ms"
            )
        else:
            out.append(f"- GEMM: {gemm.get('status')}: {gemm.get('reason')}")
    out += _legend(data)
    ratio_cols = [
        ("x ceiling", "x_ceiling"),
        ("x sarkern time", "x_sarkern_time"),
        ("x sarkern memory", "x_sarkern_memory"),
    ]
    titles = {
        "linear": "`linear_token_logprobs` (hidden states + LM head)",
        "logits": "`token_logprobs` (existing logits)",
    }
    for family, title in titles.items():
        fam = data.get("ops", {}).get(family)
        if not fam:
            continue
        shape = fam["shape"]
        for mode in ("forward", "forward_backward"):
            if mode not in fam:
                continue
            ceiling = fam.get("ceiling_ms", {}).get(mode)
            what = "GEMM" if family == "linear" else "HBM read"
            out += ["", f"## {title}, {mode.replace('_', ' + ')}", ""]
            out.append(
                f"N={shape['N']}, "
                + (f"D={shape['D']}, " if shape["D"] else "")
                + f"V={shape['V']}, {shape['dtype']}; "
                f"ceiling ({what}) {_fmt(ceiling)} ms. Peak MiB: beyond the inputs (outputs and gradients included)."
            )
            out.append("")
            out += _contender_table(fam[mode], ratio_cols)
    sp = data.get("ops", {}).get("sequence_perplexity")
    if sp:
        s = sp["shape"]
        out += [
            "",
            "## `sequence_perplexity`, forward",
            "",
            f"N={s['N']}, D={s['D']}, V={s['V']}, {s['segments']} segments, {s['dtype']}.",
            "",
        ]
        out += _contender_table(sp["forward"], [("x linear_token_logprobs", "x_linear_token_logprobs")])
    scorer = data.get("scorer")
    if scorer:
        s = scorer["shape"]
        out += ["", "## SAR scoring", ""]
        out.append(
            f"`{s['name']}`: {s['layers']} layers, hidden {s['hidden']}, vocab {s['vocab']}, {s['dtype']}; "
            f"{s['num_prompts']} prompts x {s['group']} completions, prompt {s['prompt_len']}, completions "
            f"{s['min_completion']}..{s['max_completion']} tokens ({scorer['completion_tokens']} in all). The paper's "
            f"way: two padded forwards with full logits, {scorer['paper_micro_batch']} completions per forward. "
            f"`auto` picks {scorer['auto_backend']} here."
        )
        out.append("")
        out += _contender_table(
            scorer["contenders"], [("x paper time", "x_paper_time"), ("x paper memory", "x_paper_memory")]
        )
    return "\n".join(out) + "\n"


# ----------------------------------------------------------------------------------------------- main


sys_path_additions: list[str] = []
SITE_VARIABLE = "SARKERN_GPU_CHECK_SITE"


def ensure_sarkern_importable() -> None:
    """Import this checkout's sarkern with its kernels as `sarkern.kernels` (setup.py maps `kernels/` there).

    An editable install of this checkout is used as it is. Otherwise (the GPU machine's bare copy of the tree, or
    another sarkern installed) the checkout is installed into a temporary folder first, without dependencies or
    network, and put first on the path (also for the pytest subprocess).
    """
    try:
        import sarkern

        where = Path(sarkern.__file__).resolve().parent
        installed_here = os.environ.get(SITE_VARIABLE) and where.parent == Path(os.environ[SITE_VARIABLE]).resolve()
        if (where == ROOT / "sarkern" or installed_here) and importlib.util.find_spec("sarkern.kernels") is not None:
            return
    except ImportError:
        pass
    for name in [m for m in sys.modules if m == "sarkern" or m.startswith("sarkern.")]:
        del sys.modules[name]
    target = Path(tempfile.mkdtemp(prefix="sarkern-site-"))
    print(f"   installing this checkout's sarkern into {target} (no dependencies, no index)", flush=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT),
        ],
        check=True,
    )
    sys.path.insert(0, str(target))
    sys_path_additions.insert(0, str(target))
    os.environ[SITE_VARIABLE] = str(target)  # the sections' processes import this copy, not a new one
    importlib.invalidate_caches()
    importlib.import_module("sarkern")


def install_wheels(folder: Path) -> None:
    """Install the carried peers (`make gpu-wheels`) into a temporary folder, each wheel on its own (one that does
    not fit this Python is reported, the others still install), without dependencies or network."""
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        print(f"   no wheels in {folder}/ (make gpu-wheels, then carry it): missing peers show as not installed")
        return
    target = Path(tempfile.mkdtemp(prefix="gpu-check-wheels-"))
    for wheel in wheels:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--no-deps",
                "--no-compile",
                "--target",
                str(target),
                str(wheel),
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            print(f"   could not install {wheel.name}: {done.stderr.strip().splitlines()[-1:]}", flush=True)
    sys.path.insert(0, str(target))
    sys_path_additions.append(str(target))
    importlib.invalidate_caches()
    print(f"   {len(wheels)} carried wheel(s) from {folder}/ installed into {target}", flush=True)


def device_tag(device: Device) -> str:
    name = torch.cuda.get_device_name(device.torch_device) if device.cuda else "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


SECTIONS = ("environment", "tests", "ceilings", "linear", "logits", "sequence_perplexity", "scorer")
SECTION_GRACE_S = 20  # a section's process: start-up (imports) on top of its budget before it is killed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tiny", action="store_true", help="CPU, tiny shapes, Triton's interpreter (what make test runs)"
    )
    parser.add_argument(
        "--out", type=Path, default=HERE / "results", help="folder for the .md/.json (default %(default)s)"
    )
    parser.add_argument("--sections", nargs="+", choices=SECTIONS, default=list(SECTIONS), help="run only these")
    parser.add_argument("--total-s", type=float, help="the whole run's time budget in seconds (default: 440; tiny 240)")
    parser.add_argument(
        "--budget-scale", type=float, default=1.0, help="multiply every time budget (the test suite's slow machines)"
    )
    parser.add_argument("--source-digest", action="store_true", help="print the digest of sarkern's sources and exit")
    parser.add_argument("--wheels", type=Path, help="install the peers' wheels in this folder first (make gpu-wheels)")
    parser.add_argument("--child", choices=SECTIONS[1:], help=argparse.SUPPRESS)  # one section's own process
    parser.add_argument("--child-budget", type=float, help=argparse.SUPPRESS)
    parser.add_argument("--tag", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.source_digest:
        print(source_digest())
        return 0
    settings = TINY if args.tiny else FULL
    if args.total_s:
        settings = replace(settings, total_s=args.total_s)
    if args.budget_scale != 1.0:
        settings = replace(
            settings,
            total_s=settings.total_s * args.budget_scale,
            budgets={k: v * args.budget_scale for k, v in settings.budgets.items()},
        )
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device here: the full run needs a GPU (use --tiny for the CPU check of the script)")
    if args.wheels and not args.child:
        install_wheels(args.wheels)
    try:
        ensure_sarkern_importable()
    except Exception as error:  # the ceilings and the peers can still be measured; sarkern's rows say why not
        print(f"   sarkern cannot be imported: {outcome_of(error)['reason']}", flush=True)
    device = Device(settings.device)
    today = dt.datetime.now(dt.timezone.utc)
    tag = args.tag or f"{device_tag(device)}-{'tiny-' if args.tiny else ''}{today:%Y-%m-%d}"
    run = Run(settings, device, args.out, tag)
    run.data.update(
        schema=1,
        mode=settings.name,
        tag=tag,
        started_utc=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    )
    steps = {
        "environment": environment,
        "tests": run_gpu_tests,
        "ceilings": ceilings,
        "linear": lambda r: time_op_family(r, "linear"),
        "logits": lambda r: time_op_family(r, "logits"),
        "sequence_perplexity": time_sequence_perplexity,
        "scorer": time_scorer,
    }
    if args.child:
        # One section in this process; the report so far comes from (and goes back to) the JSON file.
        run.data = json.loads((args.out / f"{tag}.json").read_text())
        run.child = True
        run.settings = replace(settings, total_s=args.child_budget, budgets={args.child: args.child_budget})
        with run.section(args.child):
            steps[args.child](run)
        return 0
    with run.section("environment"):
        environment(run)
    for name in SECTIONS[1:]:
        if name in args.sections:
            run_section_process(run, name, args)
    run.write()
    print("\n" + "\n".join(_summary(run)), flush=True)
    print(f"\nwritten: {run.out / (tag + '.md')} and .json", flush=True)
    return 0


def run_section_process(run: Run, name: str, args) -> None:
    """Run one section in its own process, so that a hung kernel (killed at the budget's end, with a grace for
    start-up) or a broken CUDA context (an illegal address in one contender) costs that section only."""
    budget = min(run.settings.budgets[name], run.settings.total_s - (time.monotonic() - run.started))
    sections = run.data.setdefault("sections", {})
    if budget <= 1:
        sections[name] = {"status": "skipped", "budget_s": 0, "seconds": 0, "reason": "no time left in the run"}
        run.write()
        return
    sections[name] = {"status": "running", "budget_s": budget}
    run.write()
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", name, "--child-budget", f"{budget:.1f}"]
    cmd += ["--tag", run.tag, "--out", str(run.out), *(["--tiny"] if args.tiny else [])]
    paths = [*sys_path_additions, os.environ.get("PYTHONPATH")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}
    start = time.monotonic()
    process = subprocess.Popen(cmd, env=env, start_new_session=True)
    try:
        code = process.wait(timeout=budget + SECTION_GRACE_S)
    except BaseException:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        code = None
    run.data = json.loads((run.out / f"{run.tag}.json").read_text())
    record = run.data.setdefault("sections", {}).setdefault(name, {"budget_s": budget})
    if record.get("status") == "running":  # the process ended inside the section
        why = f"killed after {time.monotonic() - start:.0f} s (hung)" if code is None else f"its process died ({code})"
        record.update(status="killed" if code is None else "crashed", reason=why)
        print(f"   section {name}: {why}", flush=True)
    record["process_seconds"] = round(time.monotonic() - start, 2)
    run.write()


def _summary(run: Run) -> list[str]:
    """The short table printed last (the device tool returns the end of the output)."""
    lines = ["== summary", "| target | measured | status |", "|---|---|---|"]
    for t in run.data.get("targets", []):
        lines.append(f"| {t['what']} | {_fmt(t['ratio'])} | {t['status']} |")
    for name, s in run.data.get("sections", {}).items():
        seconds = s.get("process_seconds", s.get("seconds"))
        lines.append(f"section {name}: {s['status']} in {seconds} s {s.get('reason', '')[:120]}")
    return lines


if __name__ == "__main__":
    sys.exit(main())
