"""The run: arguments, the environment section here, then every other section in a process of its own."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from . import BENCHMARKS
from . import __doc__ as overview
from .ceilings import ceilings
from .environment import environment, source_digest
from .gpu_tests import run_gpu_tests
from .install import child_environment, ensure_sarkern_importable, install_wheels
from .ops import time_op_family, time_sequence_perplexity
from .render import summary
from .report import Run
from .scorer import time_scorer
from .settings import FULL, TINY
from .timing import Device, outcome_of

# The entry script (it sets up Triton's interpreter for --tiny before anything imports sarkern's kernels); each
# section's process runs it again.
SCRIPT = BENCHMARKS / "gpu_check.py"


def device_tag(device: Device) -> str:
    name = torch.cuda.get_device_name(device.torch_device) if device.cuda else "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


SECTIONS = ("environment", "tests", "ceilings", "linear", "logits", "sequence_perplexity", "scorer")
SECTION_GRACE_S = 20  # a section's process: start-up (imports) on top of its budget before it is killed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=overview.split("\n\n")[0])
    parser.add_argument(
        "--tiny", action="store_true", help="CPU, tiny shapes, Triton's interpreter (what make test runs)"
    )
    parser.add_argument(
        "--out", type=Path, default=BENCHMARKS / "results", help="folder for the .md/.json (default %(default)s)"
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
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
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
            startup_s=settings.startup_s * args.budget_scale,
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
    selected = [name for name in SECTIONS[1:] if name in args.sections]
    for i, name in enumerate(selected):
        run_section_process(run, name, args, later=selected[i + 1 :])
    run.write()
    print("\n" + "\n".join(summary(run)), flush=True)
    print(f"\nwritten: {run.out / (tag + '.md')} and .json", flush=True)
    not_ok = {name: s["status"] for name, s in run.data.get("sections", {}).items() if s["status"] != "ok"}
    if not_ok:
        print(f"sections not ok: {not_ok}", flush=True)
    return 1 if not_ok else 0


def section_budget(settings, name: str, later: list[str], elapsed: float) -> float:
    """Seconds for section `name` when `elapsed` of the run are spent: its own budget, less only what the sections
    still to come need (their budgets and start-ups) beyond what is left. A section late in the run (the scorer) so
    keeps its whole budget when an earlier one ran long; the sections' budgets fit the total (a test checks)."""
    reserved = sum(settings.budgets[other] + settings.startup_s for other in later)
    return min(settings.budgets[name], settings.total_s - elapsed - settings.startup_s - reserved)


def run_section_process(run: Run, name: str, args, later: list[str]) -> None:
    """Run one section in its own process, so that a hung kernel (killed at the budget's end, with a grace for
    start-up) or a broken CUDA context (an illegal address in one contender) costs that section only."""
    budget = section_budget(run.settings, name, later, time.monotonic() - run.started)
    sections = run.data.setdefault("sections", {})
    planned = run.settings.budgets[name]
    if budget <= 1:
        sections[name] = {
            "status": "skipped",
            "budget_s": 0,
            "planned_s": planned,
            "seconds": 0,
            "reason": "no time left in the run",
        }
        run.write()
        return
    sections[name] = {"status": "running", "budget_s": budget, "planned_s": planned}
    run.write()
    cmd = [sys.executable, str(SCRIPT), "--child", name, "--child-budget", f"{budget:.1f}"]
    cmd += ["--tag", run.tag, "--out", str(run.out), *(["--tiny"] if args.tiny else [])]
    start = time.monotonic()
    process = subprocess.Popen(cmd, env=child_environment(), start_new_session=True)
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
    record["planned_s"] = planned
    run.write()
