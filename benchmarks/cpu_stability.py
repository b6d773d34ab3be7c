"""How steady the chunked CPU path is: each op's spread over fresh processes, idle and beside one busy core.

`python benchmarks/cpu_stability.py` (about 10 minutes at the defaults on a 2-core machine) writes
`benchmarks/results/cpu-stability-<date>.md` and `.json`. For each op (`linear_forward`, `linear_forward_backward`,
`logits_forward`, `logits_forward_backward`) and each condition (`idle`; `busy`: one spinning process that this
script starts and stops itself), `--processes` fresh interpreters each time sarkern, naive PyTorch (full logits,
`log_softmax`, `gather`) and the floor (bare `torch.mm` of the same shapes: one GEMM forward, three with the
backward; one read of the logits, and one write with the backward, for the from-logits ops) side by side:
- the first call of each at full size, reported separately (after one call at a tiny shape, which takes the
  imports and lazy set-up: recorded as `init` in the JSON);
- then `--rounds` interleaved rounds (the order rotates each round), each call with its wall time, process CPU
  time (threads spinning while they wait show up as CPU time beyond the work) and minor page faults.
Conditions and ops alternate process by process, so a change in the machine's load hits all of them alike; the
load average is recorded with every process. Peak memory beyond the inputs (sarkern and naive, a fresh process
each, `benchmarks/memory.py`) is measured once per op. Ratios are taken round by round (sarkern / naive of the
same round): median and worst over every round of every process; "worst / naive's worst" compares the two
worst calls.

`--processes 2 --rounds 2` runs in about a third of the time; `--ops`, `--conditions`, `--shape`, `--threads`
narrow it; `--sarkern DIR` imports sarkern from another source tree (to compare two revisions on one machine).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
OPS = ("linear_forward", "linear_forward_backward", "logits_forward", "logits_forward_backward")
CONDITIONS = ("idle", "busy")
CONTENDERS = ("naive", "sarkern", "floor")
FLOORS = {
    "linear_forward": "torch.mm(h, W.T)",
    "linear_forward_backward": "3 torch.mm: h W^T, G W, G^T h",
    "logits_forward": "one read: logits.amax(-1)",
    "logits_forward_backward": "one read + one write: logits.amax(-1), torch.neg(logits)",
}


def _loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


# ------------------------------------------------------------------------------------------- child process


def _floor(op: str, inputs):
    import torch

    if op == "linear_forward":
        return lambda: torch.mm(inputs.hidden, inputs.weight.T)

    def three_gemms():
        logits = torch.mm(inputs.hidden, inputs.weight.T)
        torch.mm(logits, inputs.weight)
        torch.mm(logits.T, inputs.hidden)

    if op == "linear_forward_backward":
        return three_gemms
    if op == "logits_forward":
        return lambda: inputs.logits.amax(-1)
    return lambda: (inputs.logits.amax(-1), torch.neg(inputs.logits))


def _timed(fn) -> dict:
    before, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    fn()
    wall, after = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return {"wall_s": wall, "cpu_s": cpu, "minflt": after.ru_minflt - before.ru_minflt}


def child(op: str, n: int, d: int, v: int, rounds: int, threads: int | None) -> dict:
    """One fresh process: first calls, then interleaved rounds of naive, sarkern and the floor for `op`."""
    import torch
    from contenders import FAMILIES, make_inputs

    if threads:
        torch.set_num_threads(threads)
    family, mode = op.split("_", 1)
    backward = mode == "forward_backward"

    def contenders(inputs) -> dict:
        return {
            "naive": FAMILIES[family]["naive"](inputs, backward),
            "sarkern": FAMILIES[family]["sarkern"](inputs, backward),
            "floor": _floor(op, inputs),
        }

    # Lazy set-up (imports, op registration, torch's thread team) at a tiny shape, timed apart from the first call.
    tiny = contenders(make_inputs(family, 64, min(d, 64), 256, torch.float32, "cpu", backward))
    init = {name: _timed(tiny[name]) for name in CONTENDERS}
    fns = contenders(make_inputs(family, n, d, v, torch.float32, "cpu", backward))
    load = [_loadavg()]
    first = {name: _timed(fns[name]) for name in CONTENDERS}
    calls = {name: [] for name in CONTENDERS}
    for r in range(rounds):
        order = CONTENDERS[r % 3 :] + CONTENDERS[: r % 3]
        for name in order:
            calls[name].append(_timed(fns[name]))
    load.append(_loadavg())
    return {"threads": torch.get_num_threads(), "loadavg": load, "init": init, "first": first, "rounds": calls}


# ------------------------------------------------------------------------------------------------- parent


def _run_child(args, op: str) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", op, "--rounds", str(args.rounds)]
    cmd += ["--shape", *map(str, args.shape)] + (["--threads", str(args.threads)] if args.threads else [])
    cmd += ["--sarkern", str(args.sarkern)] if args.sarkern else []
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


class Spinner:
    """One process that keeps one core busy (nice 0) while the `busy` condition runs."""

    def __enter__(self):
        self.proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
        time.sleep(0.5)
        return self

    def __exit__(self, *exc):
        self.proc.kill()
        self.proc.wait()


def _memory(args, op: str) -> dict:
    from memory import cpu_peak_bytes

    n, d, v = args.shape
    family, mode = op.split("_", 1)
    env_path = [str(args.sarkern)] if args.sarkern else []
    old = os.environ.get("PYTHONPATH")
    if env_path:
        os.environ["PYTHONPATH"] = os.pathsep.join(env_path + ([old] if old else []))
    try:
        peaks = {name: cpu_peak_bytes(family, name, n, d if family == "linear" else 0, v, "float32", mode)
                 for name in ("naive", "sarkern")}  # fmt: skip
    finally:
        if env_path:
            os.environ.pop("PYTHONPATH") if old is None else os.environ.__setitem__("PYTHONPATH", old)
    return {name: peak / 2**20 for name, peak in peaks.items()}


def _stats(values: list[float]) -> dict:
    return {"median": statistics.median(values), "worst": max(values), "best": min(values), "n": len(values)}


def summarize(runs: list[dict]) -> dict:
    """Per contender: first-call and steady-state times; sarkern / naive and sarkern / floor round by round."""
    out = {}
    for name in CONTENDERS:
        steady = [c for run in runs for c in run["rounds"][name]]
        out[name] = {
            "first_s": _stats([run["first"][name]["wall_s"] for run in runs]),
            "steady_s": _stats([c["wall_s"] for c in steady]),
            "cpu_per_wall": statistics.median(c["cpu_s"] / c["wall_s"] for c in steady),
            "minflt_per_call": statistics.median(c["minflt"] for c in steady),
        }
    pairs = [
        (s["wall_s"], nv["wall_s"], fl["wall_s"])
        for run in runs
        for s, nv, fl in zip(run["rounds"]["sarkern"], run["rounds"]["naive"], run["rounds"]["floor"])
    ]
    out["ratio_to_naive"] = _stats([s / nv for s, nv, _ in pairs])
    out["ratio_to_floor"] = _stats([s / fl for s, _, fl in pairs])
    out["worst_over_naive_worst"] = out["sarkern"]["steady_s"]["worst"] / out["naive"]["steady_s"]["worst"]
    out["first_over_naive_first"] = _stats(
        [run["first"]["sarkern"]["wall_s"] / run["first"]["naive"]["wall_s"] for run in runs]
    )
    out["loadavg"] = [load for run in runs for load in run["loadavg"]]
    return out


def _machine() -> dict:
    import torch

    model = platform.processor()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        pass
    l2 = ""
    for index in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
        try:
            if (index / "level").read_text().strip() == "2":
                l2 = (index / "size").read_text().strip()
        except OSError:
            pass
    try:
        thp = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text().strip()
    except OSError:
        thp = "n/a"
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=HERE)
        commit = commit.stdout.strip() + (" (+ uncommitted changes)" if _dirty() else "")
    except OSError:
        commit = "?"
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "l2_per_core": l2,
        "transparent_hugepage": thp,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads_default": torch.get_num_threads(),
        "parallel_backend": next(
            (ln.split(":", 1)[1].strip() for ln in torch.__config__.parallel_info().splitlines() if "backend" in ln),
            "?",
        ),
        "commit": commit,
    }


def _dirty() -> bool:
    done = subprocess.run(["git", "status", "--porcelain", "--", "sarkern"], capture_output=True, text=True, cwd=HERE)
    return bool(done.stdout.strip())


def render(result: dict) -> str:
    m, a = result["machine"], result["args"]
    n, d, v = a["shape"]
    lines = [
        f"# CPU stability: {result['tag']}",
        "",
        f"- machine: {m['cpu']}, {m['cores']} cores ({m['usable_cores']} usable), L2 {m['l2_per_core']} per core, "
        f"THP {m['transparent_hugepage']}",
        f"- python {m['python']}, torch {m['torch']} ({m['parallel_backend']}), torch threads "
        f"{a['threads'] or m['torch_threads_default']}; sarkern {a['sarkern'] or 'this checkout'} at {m['commit']}",
        f"- shape N={n}, D={d}, V={v}, fp32; {a['processes']} fresh processes per op and condition, "
        f"{a['rounds']} interleaved rounds each after the first call; busy = one spinning process (nice 0)",
        f"- load average (1, 5, 15 min) at start {result['loadavg_start']}, at end {result['loadavg_end']}; "
        f"date {result['date']}; took {result['took_s']:.0f} s",
        "",
        "Ratios are sarkern / naive of the same round (median and worst over all rounds of all processes); "
        "worst / naive's worst divides the two slowest calls; cpu/wall is process CPU time per wall second "
        "(at most the thread count; spinning threads raise it without doing work).",
        "",
        "| op | condition | naive median / worst | sarkern median / worst | ratio median | ratio worst | "
        "worst / naive's worst | first call: sarkern, naive | sarkern / floor | cpu/wall sarkern, naive | "
        "page faults per call sarkern, naive | memory ratio | load |",
        "|" + "---|" * 13,
    ]
    ms = lambda x: f"{x * 1e3:.0f} ms"  # noqa: E731
    for op in a["ops"]:
        mem = result["memory"].get(op)
        mem_ratio = (
            f"{mem['sarkern'] / mem['naive']:.3f}x ({mem['sarkern']:.1f} MiB)" if mem and mem["naive"] > 0 else "n/a"
        )
        for cond in a["conditions"]:
            s = result["summary"].get(op, {}).get(cond)
            if not s:
                continue
            nv, sk = s["naive"], s["sarkern"]
            loads = sorted(float(x.split()[0]) for x in s["loadavg"])
            lines.append(
                f"| {op} | {cond} | {ms(nv['steady_s']['median'])} / {ms(nv['steady_s']['worst'])} | "
                f"{ms(sk['steady_s']['median'])} / {ms(sk['steady_s']['worst'])} | "
                f"{s['ratio_to_naive']['median']:.2f}x | {s['ratio_to_naive']['worst']:.2f}x | "
                f"{s['worst_over_naive_worst']:.2f}x | {ms(sk['first_s']['median'])} "
                f"(worst {ms(sk['first_s']['worst'])}), {ms(nv['first_s']['median'])} | "
                f"{s['ratio_to_floor']['median']:.2f}x | "
                f"{sk['cpu_per_wall']:.2f}, {nv['cpu_per_wall']:.2f} | "
                f"{sk['minflt_per_call']:.0f}, {nv['minflt_per_call']:.0f} | {mem_ratio} | "
                f"{loads[0]:.1f}-{loads[-1]:.1f} |"
            )
    lines += ["", "Floors (the `floor` contender): " + "; ".join(f"{op}: {FLOORS[op]}" for op in a["ops"]), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--processes", type=int, default=4, help="fresh processes per op and condition")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds per process after the first call")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--conditions", nargs="+", choices=CONDITIONS, default=list(CONDITIONS))
    parser.add_argument("--shape", nargs=3, type=int, default=[4096, 512, 32000], metavar=("N", "D", "V"))
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own)")
    parser.add_argument("--sarkern", type=Path, help="import sarkern from this source tree")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--tag", help="result file name (default: cpu-stability-<date>)")
    parser.add_argument("--child", choices=OPS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.sarkern:
        sys.path.insert(0, str(args.sarkern.resolve()))
    sys.path.insert(0, str(HERE))
    if args.child:
        print(json.dumps(child(args.child, *args.shape, args.rounds, args.threads or None)))
        return

    started, load_start = time.perf_counter(), _loadavg()
    runs: dict[str, dict[str, list]] = {op: {c: [] for c in args.conditions} for op in args.ops}
    for p in range(args.processes):
        for cond in args.conditions if p % 2 == 0 else args.conditions[::-1]:
            spinner = Spinner() if cond == "busy" else None
            with spinner or _nothing():
                for op in args.ops:
                    runs[op][cond].append(_run_child(args, op))
                    last = runs[op][cond][-1]["rounds"]
                    print(f"process {p + 1}/{args.processes} {cond:4s} {op}: naive "
                          f"{statistics.median(c['wall_s'] for c in last['naive']):.3f} s, sarkern "
                          f"{statistics.median(c['wall_s'] for c in last['sarkern']):.3f} s; load {_loadavg()}",
                          flush=True)  # fmt: skip
    memory = {} if args.no_memory else {op: _memory(args, op) for op in args.ops}
    tag = args.tag or f"cpu-stability-{dt.date.today().isoformat()}"
    result = {
        "tag": tag,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "args": {**vars(args), "sarkern": str(args.sarkern) if args.sarkern else None, "out": str(args.out)},
        "machine": _machine(),
        "loadavg_start": load_start,
        "loadavg_end": _loadavg(),
        "took_s": time.perf_counter() - started,
        "memory": memory,
        "summary": {op: {c: summarize(r) for c, r in conds.items() if r} for op, conds in runs.items()},
        "runs": runs,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{tag}.json").write_text(json.dumps(result, indent=1))
    (args.out / f"{tag}.md").write_text(render(result))
    print(f"wrote {args.out / tag}.md and .json")


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


if __name__ == "__main__":
    main()
