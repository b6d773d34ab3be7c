"""A pytest plugin for the GPU tests' process (`-p gpucheck.import_probe`): which sarkern the tests import.

At configure time, before any test file is collected (and so before the GPU tests skip for want of CUDA), it
imports `sarkern` and `sarkern.kernels` and writes where each came from, or the error, to the JSON file named by
$SARKERN_GPU_CHECK_IMPORT_PROBE; the test files then get these same modules from sys.modules. At the session's end
it adds where `sarkern` came from then, in case a test file put another copy first. `gpu_tests.py` checks that both
are the installed copy, never the checkout's source tree (which has no `sarkern.kernels`).
"""

from __future__ import annotations

import importlib
import json
import os
import sys

PROBE_VARIABLE = "SARKERN_GPU_CHECK_IMPORT_PROBE"
_record: dict = {}


def _where(module_name: str) -> dict:
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # recorded, never raised: the check in gpu_tests.py names it
        return {"error": f"{type(error).__name__}: {error}"}
    return {"file": os.path.abspath(module.__file__ or "")}


def _write() -> None:
    path = os.environ.get(PROBE_VARIABLE)
    if path:
        with open(path, "w") as sink:
            json.dump(_record, sink, indent=2)


def pytest_configure(config) -> None:
    _record.update(
        python=sys.executable,
        safe_path=bool(sys.flags.safe_path),
        cwd=os.getcwd(),
        sys_path_head=sys.path[:4],
        sarkern=_where("sarkern"),
        sarkern_kernels=_where("sarkern.kernels"),
    )
    _write()


def pytest_sessionfinish(session, exitstatus) -> None:
    module = sys.modules.get("sarkern")
    _record["sarkern_at_end"] = os.path.abspath(module.__file__) if module is not None else None
    _write()
