"""`make gpu-check`'s entry script: everything GPU-side in one run of at most 8 minutes (DESIGN.md sections 4 and 6).

The code is the package beside this script, `gpucheck/` (its `__init__.py` says which module does what). Usage:
`python3 benchmarks/gpu_check.py --wheels .gpu-wheels --out "$OUT"` on a GPU machine, or `--tiny` on the CPU.
Each section's process runs this script again (`gpucheck.main.SCRIPT`).
"""

import os
import sys

if "--tiny" in sys.argv:
    # Triton picks its interpreter when a kernel is defined: before sarkern's kernels are first imported.
    os.environ.setdefault("TRITON_INTERPRET", "1")

from gpucheck.main import main  # noqa: E402  (after the interpreter's switch above)

if __name__ == "__main__":
    sys.exit(main())
