"""Section 2: `tests/test_gpu_*.py` through pytest, in a subprocess with a hard timeout; outcomes per test."""

from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

from . import ROOT
from .install import child_environment
from .report import Run
from .timing import BudgetExceeded


def run_gpu_tests(run: Run) -> None:
    """pytest on tests/test_gpu_*.py in a subprocess (its own process group, killed whole at the budget's end)."""
    files = sorted(glob.glob(str(ROOT / "tests" / "test_gpu_*.py")))
    junit = run.out / f"{run.tag}.tests.junit.xml"
    log = run.out / f"{run.tag}.tests.log"
    cmd = [sys.executable, "-m", "pytest", *files, "-o", "addopts=", "-v", "-rfEs", "-p", "no:cacheprovider"]
    cmd.append(f"--junitxml={junit}")
    env = child_environment()
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
    record.update(junit_summary(junit) if junit.exists() else log_summary(text))
    record["log_tail"] = text[-3000:]
    print(f"   tests: { {k: record.get(k) for k in ('passed', 'failed', 'errors', 'skipped', 'exit_code')} }")
    if record.get("timed_out_after_s") is not None:
        raise BudgetExceeded(f"pytest stopped after {record['timed_out_after_s']} s; outcomes so far from its log")


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
