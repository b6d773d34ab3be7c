"""`sar/step_share` of `sarkern train` on the scorer's default path and with the universal path forced.

    python benchmarks/sar_step_share.py --steps 10 --out benchmarks/results/step-share.json [-- more train flags]

`sarkern train` has no flag for the scoring path, and this script adds none to the package: each run is the
ordinary CLI (`sarkern.cli.main(["train", ...])`, default options but `--steps`, `--output-dir` and `--no-resume`)
in a fresh process of its own, where, for the forced run only, the default of `SARScorer`'s `scoring_path` keyword
is set to "universal" before the trainer builds its scorer (the trainer passes no `scoring_path`, so it gets the
default). Nothing else differs between the two runs. Each run's `metrics.jsonl` gives `sar/step_share` (SAR's time
over the training step's, logged every step) and `sar/packed_path` (1 on the packed path, 0 on the universal one),
which confirms the path that ran; the median over the steps is reported, and over the steps after the first (the
first scoring call decides the path: the head check and, on the default path, the packed path's probe).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PATHS = ("auto", "universal")


def _train_here(path: str, output_dir: Path, steps: int, extra: list[str]) -> int:
    """One `sarkern train` run in this process, the scorer's default path set to `path` first."""
    if path != "auto":
        from sarkern.scorer import SARScorer

        SARScorer.__init__.__kwdefaults__["scoring_path"] = path
    from sarkern.cli import main as cli_main

    return cli_main(["train", "--steps", str(steps), "--output-dir", str(output_dir), "--no-resume", *extra])


def _summary(metrics_path: Path) -> dict:
    records = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
    steps = [r for r in records if "sar/step_share" in r]
    shares = [r["sar/step_share"] for r in steps]
    seconds = [r.get("sar/seconds") for r in steps]
    packed = [r.get("sar/packed_path") for r in steps]
    return {
        "steps": len(steps),
        "step_share": shares,
        "sar_seconds": seconds,
        "packed_path": packed,
        "median_step_share": statistics.median(shares) if shares else None,
        "median_step_share_after_step_1": statistics.median(shares[1:]) if len(shares) > 1 else None,
        "median_sar_seconds_after_step_1": statistics.median(seconds[1:]) if len(seconds) > 1 else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    parser.add_argument("--out", type=Path, help="write the summary JSON here")
    parser.add_argument("--work-dir", type=Path, help="run directories go here (default: a temporary directory)")
    parser.add_argument("--only", choices=PATHS, help="(internal) train once in this process on this path")
    parser.add_argument("--run-dir", type=Path, help="(internal) the run directory of --only")
    args, extra = parser.parse_known_args(argv)
    extra = [a for a in extra if a != "--"]
    if args.only:
        return _train_here(args.only, args.run_dir, args.steps, extra)

    work = args.work_dir or Path(tempfile.mkdtemp(prefix="sar-step-share-"))
    runs = {}
    for path in args.paths:
        run_dir = work / f"run-{path}"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--only", path, "--run-dir", str(run_dir)]
        cmd += ["--steps", str(args.steps), *extra]
        start = time.monotonic()
        done = subprocess.run(cmd, env={**os.environ})
        if done.returncode != 0:
            print(f"sarkern train on the {path} path failed (exit {done.returncode})", file=sys.stderr)
            return done.returncode
        runs[path] = {"wall_s": time.monotonic() - start, **_summary(run_dir / "metrics.jsonl")}
        expected = 0.0 if path == "universal" else None
        if expected is not None and any(p != expected for p in runs[path]["packed_path"]):
            print(f"the {path} run did not score on the universal path: {runs[path]['packed_path']}", file=sys.stderr)
            return 1

    import torch
    import transformers
    import trl

    report = {
        "command": f"sarkern train --steps {args.steps} {' '.join(extra)}".strip(),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__},
        "torch_threads": torch.get_num_threads(),
        "runs": runs,
    }
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    for path, run in runs.items():
        print(
            f"{path:<10} steps {run['steps']}, sar/step_share median {run['median_step_share']:.3f} "
            f"(after step 1: {run['median_step_share_after_step_1']:.3f}), packed_path {run['packed_path']}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
