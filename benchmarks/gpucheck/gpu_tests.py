"""Section 2: `tests/test_gpu_*.py` through pytest against the installed sarkern, in subprocesses with hard
timeouts; outcomes per test.

The tests import the copy of sarkern that `install.py` made importable (the one with `sarkern.kernels`), never the
checkout's source tree: pytest runs with PYTHONSAFEPATH=1 from a temporary folder outside the checkout (so neither
the working directory nor `-m`'s path entry puts the tree first), and the `import_probe` plugin records which
sarkern and sarkern.kernels the tests got before any of them is collected; a copy other than the installed one fails
the section by name. The Triton kernel tests run first, in a pytest of their own that may take at most
KERNEL_TESTS_SHARE of the section; the FlexAttention tests (cold `torch.compile`s, the section's biggest unknown)
and any other GPU test file get what is left.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from . import BENCHMARKS, ROOT
from .import_probe import PROBE_VARIABLE
from .install import SITE_VARIABLE, child_environment
from .report import Run
from .timing import BudgetExceeded, Unavailable

KERNEL_TESTS = "test_gpu_kernels.py"
KERNEL_TESTS_SHARE = 0.65
COUNTS = ("passed", "failed", "errors", "skipped")


def gpu_test_parts() -> list[tuple[str, list[str]]]:
    """(part, test files) in the order they run: the Triton kernel tests, then the others (FlexAttention)."""
    files = sorted(glob.glob(str(ROOT / "tests" / "test_gpu_*.py")))
    kernels = [f for f in files if Path(f).name == KERNEL_TESTS]
    others = [f for f in files if Path(f).name != KERNEL_TESTS]
    return [(part, chosen) for part, chosen in (("kernels", kernels), ("others", others)) if chosen]


def pytest_command(files: list[str], junit: Path) -> list[str]:
    return [
        sys.executable,
        "-m",
        "pytest",
        *files,
        "--rootdir",
        str(ROOT),
        "-c",
        str(ROOT / "pytest.ini"),
        "-o",
        "addopts=",
        "-v",
        "-rfEs",
        "-p",
        "no:cacheprovider",
        "-p",
        "gpucheck.import_probe",
        f"--junitxml={junit}",
    ]


def pytest_environment(probe: Path) -> dict[str, str]:
    env = child_environment()
    env.pop("SARKERN_BACKEND", None)
    env["PYTHONSAFEPATH"] = "1"  # `python -m pytest` would put its working directory first on sys.path
    # The plugin's package last: it must not put anything ahead of the installed sarkern.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (env.get("PYTHONPATH"), str(BENCHMARKS)) if p)
    env[PROBE_VARIABLE] = str(probe)
    return env


def run_gpu_tests(run: Run) -> None:
    """Each part's pytest in a subprocess (its own process group, killed whole at the part's budget's end)."""
    if importlib.util.find_spec("pytest") is None:
        raise Unavailable("pytest is not installed here (carry its wheels with the peers' in make gpu-wheels)")
    parts = gpu_test_parts()
    log = run.out / f"{run.tag}.tests.log"
    record: dict = {
        "files": [Path(f).name for _, files in parts for f in files],
        "parts": {},
        **dict.fromkeys(COUNTS, 0),
        "failures": [],
        "skip_reasons": [],
        "exit_code": 0,
    }
    run.data["tests"] = record
    log.write_text("")
    section_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gpu-check-pytest-") as outside:
        for i, (part, files) in enumerate(parts):
            left = run.remaining() - 5
            timeout = max(1.0, left * KERNEL_TESTS_SHARE if i == 0 and len(parts) > 1 else left)
            outcome = _run_part(run, part, files, timeout, Path(outside), log)
            record["parts"][part] = outcome
            for key in COUNTS:
                record[key] += outcome.get(key, 0)
            record["failures"] += outcome.get("failures", [])
            record["skip_reasons"] = sorted({*record["skip_reasons"], *outcome.get("skip_reasons", [])})
            if record["exit_code"] == 0:  # the first part's that was not 0 (None: killed at its budget)
                record["exit_code"] = outcome["exit_code"]
            check = import_check(outcome.pop("probe"))
            record.setdefault("import_check", check)
            print(f"   tests {part}: imports {json.dumps(check)}", flush=True)
            if not check["ok"]:  # every test would fail on the wrong copy: the rest of the section is not spent
                record["import_check"] = check
                raise RuntimeError(f"the GPU tests did not import the installed sarkern: {check['reason']}")
    record["command"] = " ".join(pytest_command(["tests/test_gpu_*.py"], Path("<tag>.tests.<part>.junit.xml"))[1:])
    record["seconds"] = round(time.monotonic() - section_start, 1)
    record["log_tail"] = log.read_text(errors="replace")[-3000:]
    print(f"   tests: { {k: record.get(k) for k in (*COUNTS, 'exit_code')} }", flush=True)
    cut = [part for part, outcome in record["parts"].items() if outcome.get("timed_out_after_s") is not None]
    if cut:
        raise BudgetExceeded(f"pytest stopped at its budget in part(s) {cut}; outcomes so far from its log")


def _run_part(run: Run, part: str, files: list[str], timeout: float, cwd: Path, log: Path) -> dict:
    junit = run.out / f"{run.tag}.tests.{part}.junit.xml"
    probe = cwd / f"import-probe-{part}.json"
    cmd = pytest_command(files, junit)
    outcome: dict = {"files": [Path(f).name for f in files], "timeout_s": round(timeout, 1)}
    start = time.monotonic()
    with open(log, "a") as sink:
        sink.write(f"==== part {part}: {' '.join(cmd[1:])} (cwd {cwd}, timeout {timeout:.0f} s)\n")
        sink.flush()
        process = subprocess.Popen(
            cmd, cwd=cwd, env=pytest_environment(probe), stdout=sink, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            outcome["exit_code"] = process.wait(timeout=timeout)
        except BaseException:  # over the budget (or interrupted): stop pytest and whatever it started
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            outcome["exit_code"] = None
            outcome["timed_out_after_s"] = round(time.monotonic() - start)
    outcome["seconds"] = round(time.monotonic() - start, 1)
    if junit.exists() and outcome["exit_code"] is not None:
        outcome.update(junit_summary(junit))
    else:
        text = log.read_text(errors="replace")
        outcome.update(log_summary(text[text.rfind(f"==== part {part}:") :]))
    outcome["probe"] = json.loads(probe.read_text()) if probe.exists() else None
    print(f"   tests {part}: { {k: outcome.get(k) for k in (*COUNTS, 'exit_code', 'seconds')} }", flush=True)
    return outcome


_names = {
    "sarkern": "sarkern",
    "sarkern_kernels": "sarkern.kernels",
    "sarkern_at_end": "sarkern (at the session's end)",
}


def import_check(probe: dict | None) -> dict:
    """Whether the tests' process imported sarkern and sarkern.kernels from the installed copy (the folder that
    install.py put first, $SARKERN_GPU_CHECK_SITE), not from this checkout's source tree."""
    site = os.environ.get(SITE_VARIABLE)
    if probe is None:
        return {"ok": False, "reason": "the import probe wrote nothing (pytest did not start the plugin)"}
    found = {key: probe.get(key, {}) for key in ("sarkern", "sarkern_kernels")}
    check = {
        "ok": False,
        "site": site,
        "sarkern": found["sarkern"].get("file") or found["sarkern"].get("error"),
        "sarkern.kernels": found["sarkern_kernels"].get("file") or found["sarkern_kernels"].get("error"),
        "safe_path": probe.get("safe_path"),
    }
    if not site:
        check["reason"] = "no installed copy of sarkern to check against (install.py did not run)"
        return check
    site_path = Path(site).resolve()
    found["sarkern_at_end"] = {"file": probe["sarkern_at_end"]} if probe.get("sarkern_at_end") else {}
    for key in ("sarkern", "sarkern_kernels", "sarkern_at_end"):
        file = found[key].get("file")
        if key == "sarkern_at_end" and not found[key]:
            continue  # pytest was killed before the session's end
        if file is None:
            check["reason"] = f"{_names[key]} failed to import: {found[key].get('error')}"
            return check
        path = Path(file).resolve()
        if not path.is_relative_to(site_path):
            where = "this checkout's source tree" if path.is_relative_to(ROOT) else "elsewhere"
            check["reason"] = f"{_names[key]} came from {where} ({path}), not the installed copy"
            return check
    check["ok"] = True
    return check


def junit_summary(path: Path) -> dict:
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


def log_summary(text: str) -> dict:
    """Outcomes from pytest's verbose lines, for a run stopped before it wrote its JUnit report."""
    outcomes = dict(re.findall(r"^(\S+::\S+) (PASSED|FAILED|SKIPPED|ERROR)", text, flags=re.M))
    counts = {
        key: sum(1 for o in outcomes.values() if o == word)
        for key, word in (("passed", "PASSED"), ("failed", "FAILED"), ("errors", "ERROR"), ("skipped", "SKIPPED"))
    }
    failures = [f"{name}: {o}" for name, o in outcomes.items() if o in ("FAILED", "ERROR")]
    return {**counts, "failures": failures, "skip_reasons": [], "unfinished": True}
