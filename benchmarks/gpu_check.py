"""The GPU window's entry script: everything GPU-side in one run of at most 8 minutes.

The command to send, its carry list and its timeout are in `benchmarks/GPU_WINDOW.md` (one place, copy-pasteable):
`python3 benchmarks/gpu_check.py --wheels .gpu-wheels --out "$OUT"` from the repository root, no make and no
PYTHONPATH needed; `--tiny` runs the same code on the CPU. The code is the package beside this script, `gpucheck/`
(its `__init__.py` says which module does what). Each section's process runs this script again
(`gpucheck.main.SCRIPT`).
"""

import os
import sys

# This script's folder holds `gpucheck/` and the benchmarks' modules. Python puts it first on sys.path only without
# PYTHONSAFEPATH (or -P), so it is put there here, whatever the interpreter's flags.
HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

if "--tiny" in sys.argv:
    # Triton picks its interpreter when a kernel is defined: before sarkern's kernels are first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from gpucheck.main import main  # noqa: E402  (after the path and the interpreter's switch above)

if __name__ == "__main__":
    sys.exit(main())
