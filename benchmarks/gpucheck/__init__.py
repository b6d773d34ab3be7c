"""The GPU window's check: everything GPU-side in one run of at most 8 minutes. The command to send, its carry list
and timeout: `benchmarks/GPU_WINDOW.md`.

In order, each section in its own process and time budget (a hung kernel is killed, a broken CUDA context ends with
its section), a failure in one recorded and the next one run:
1. the device and versions (torch, Triton, driver, sarkern's commit and source digest, the peers and what they need),
   the peers whose requirements the image does not meet (their rows refused by name), and on the CPU whether
   Triton's interpreter can run sarkern's kernels: `environment.py` (`install.py`,
   `sarkern.backends.interpreter_problem`);
2. `tests/test_gpu_*.py` through pytest against the installed sarkern, the Triton kernel tests first, then the
   FlexAttention ones (subprocesses with hard timeouts; pass/fail per test recorded; which sarkern they imported
   recorded by the `import_probe.py` plugin and checked): `gpu_tests.py`;
3. the two ceilings: HBM bandwidth (a large device-to-device copy, bytes read + written, and a read-only
   reduction) and bare cuBLAS GEMMs of section 4's shape (the logits GEMM and the two gradient GEMMs): `ceilings.py`;
4. `linear_token_logprobs` forward (no grad) and forward + backward, `token_logprobs` from existing logits and
   `sequence_perplexity`, each against the ceilings and the peers (`contenders.py`: TRL's chunked log-prob,
   Liger-Kernel FLCE and fused scaled CE, Cut Cross-Entropy, torch `linear_cross_entropy`, naive PyTorch),
   peak memory beside every time; every sarkern result checked once against a float64 reference: `ops.py`
   (which sarkern configurations, kernel candidates included: `variants.py`; the float64 checks: `accuracy.py`);
5. the SAR scorer at the Qwen3-1.7B shape (96 completions) with each attention backend against the paper's way:
   `scorer.py`;
6. the targets, each marked met or missed with its ratio: `targets.py`.

The section budgets and each section process's start-up fit in the total (`settings.py`); a section is given its
budget less only what the sections after it need of a run that ran late (`main.section_budget`), so the scorer,
last, never gets only what is left.

Writes `<out>/<device>-<date>.json` and `.md` after every section (a run stopped midway leaves what it measured;
`report.py`, `render.py`) and the tests' log and JUnit XML beside them. `--tiny` runs the same code on the CPU at
tiny shapes, sarkern's Triton kernels under Triton's interpreter (`TRITON_INTERPRET=1`) and its chunked PyTorch
path; the test suite runs it that way (`tests/test_gpucheck_script.py`), so the script cannot rot between GPU
windows. `main.py` parses the arguments and runs the sections; `install.py` makes this checkout's sarkern and the
carried peers importable on a GPU machine where neither is installed.

Run it as `python3 benchmarks/gpu_check.py` (the entry script beside this package; each section's process runs it
again). Timing: `triton.testing.do_bench` medians on CUDA (warm-up excluded; it clears the L2 cache before every
timed call, so inputs that would fit in L2 are not served from it), a median of `perf_counter` rounds on the CPU;
the scorer (seconds per call) is timed over a few calls with CUDA events. Peak memory: the CUDA allocator's peak
beyond what was allocated before the call (inputs, model); on the CPU the peak resident set of the call
(`memory.py`).
"""

from __future__ import annotations

import sys
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent.parent
ROOT = BENCHMARKS.parent

# The benchmarks' own modules (contenders, labels, memory, bench_scorer) are imported as top-level modules, on the
# GPU machine too, where nothing of this checkout is installed.
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))
