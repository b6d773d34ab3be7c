"""`make bench`: run the benchmark suite and render its results.

Writes, under `benchmarks/results/`, for one run tagged `<device>-<date>`:
- `<tag>.json`: pytest-benchmark's JSON (machine, versions, GPU name, every round);
- `<tag>.md`: what each contender computes, in words; per group, each contender's median time (with the fastest
  and slowest round) and peak memory, and both as a ratio to the group's baseline (naive PyTorch for the ops, the
  paper's way for scoring); skipped contenders with their reasons;
- `<tag>.png`: the same ratios as a plot.

`python benchmarks/run.py --report FILE.json` re-renders the table and the plot of an earlier run.

On CPU this suite's medians come from one process per contender; how steady the chunked path is over fresh
processes, idle and beside a busy core, is `python benchmarks/cpu_stability.py` (`cpu-stability-<date>.md`).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import labels

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BASELINE = "sarkern"


def _device_tag() -> str:
    import torch

    name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def run_suite(tag: str, extra_args: list[str]) -> tuple[Path, Path]:
    RESULTS.mkdir(parents=True, exist_ok=True)
    json_path = RESULTS / f"{tag}.json"
    junit_path = RESULTS / f".{tag}.junit.xml"
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(HERE),
        "-o",
        f"testpaths={HERE}",
        "-p",
        "no:cacheprovider",
        "--benchmark-only",
        f"--benchmark-json={json_path}",
        f"--junitxml={junit_path}",
        "-rs",
        "--benchmark-columns=median,min,max,rounds",
        "--benchmark-sort=name",
        *extra_args,
    ]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)
    return json_path, junit_path


def _skips(junit_path: Path | None) -> list[tuple[str, str]]:
    if junit_path is None or not junit_path.exists():
        return []
    skipped = []
    for case in ET.parse(junit_path).getroot().iter("testcase"):
        node = case.find("skipped")
        if node is not None:
            skipped.append((case.get("name", "?"), node.get("message", "")))
    return skipped


def _rows(data: dict) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for bench in data["benchmarks"]:
        info = bench.get("extra_info", {})
        stats = bench["stats"]
        groups.setdefault(bench["group"] or "ungrouped", []).append(
            {
                "contender": info.get("contender", bench["name"]),
                "family": info.get("family", ""),
                "median_s": stats["median"],
                "min_s": stats["min"],
                "max_s": stats["max"],
                "rounds": stats["rounds"],
                "peak_mib": info.get("peak_mib"),
            }
        )
    return groups


def _baseline(rows: list[dict]) -> dict | None:
    """The row each group's ratios are taken against: naive PyTorch for the ops, the paper's way for scoring."""
    family = rows[0]["family"] if rows else ""
    name = labels.BASELINES.get(family, BASELINE)
    return next((r for r in rows if r["contender"] == name), None)


def _ratio(value, base) -> str:
    if value is None or base in (None, 0):
        return "n/a"
    return f"{value / base:.2f}x"


def render(json_path: Path, junit_path: Path | None = None) -> tuple[Path, Path]:
    data = json.loads(json_path.read_text())
    machine = data.get("machine_info", {})
    groups = _rows(data)
    lines = [
        f"# Benchmarks: {json_path.stem}",
        "",
        f"- device: {machine.get('device')}; CPU: {machine.get('cpu', {}).get('brand_raw', machine.get('processor'))}"
        f"; torch threads: {machine.get('torch_threads')}",
        f"- python {machine.get('python_version')}, torch {machine.get('torch')}, triton {machine.get('triton')}, "
        f"transformers {machine.get('transformers')}, trl {machine.get('trl')}",
        f"- date: {data.get('datetime')}; commit: {data.get('commit_info', {}).get('id', '?')[:10]}",
        "",
        "Each group runs its contenders side by side in one run on the same inputs. Time: median over the rounds, "
        "with the fastest and slowest round; memory: peak beyond the inputs (on CPU, a fresh process per contender). "
        "Ratios are to the group's baseline, named in its heading: below 1 is faster or smaller than the baseline.",
        "",
    ]
    seen = sorted({r["contender"] for rows in groups.values() for r in rows})
    lines += ["## Contenders", ""] + [f"- **{labels.label(c)}**: {labels.description(c)}." for c in seen] + [""]
    for group, rows in sorted(groups.items()):
        base = _baseline(rows)
        base_name = labels.label(base["contender"]) if base else "n/a"
        lines += [
            f"## {group} (ratios to {base_name})",
            "",
            "| contender | median | fastest - slowest (rounds) | time ratio | peak MiB | memory ratio |",
            "|---|---|---|---|---|---|",
        ]
        for row in sorted(rows, key=lambda r: r["median_s"]):
            lines.append(
                f"| {labels.label(row['contender'])} | {row['median_s'] * 1e3:.1f} ms | "
                f"{row['min_s'] * 1e3:.1f} - {row['max_s'] * 1e3:.1f} ms ({row['rounds']}) | "
                f"{_ratio(row['median_s'], base and base['median_s'])} | {row['peak_mib']} | "
                f"{_ratio(row['peak_mib'], base and base['peak_mib'])} |"
            )
        lines.append("")
    skipped = _skips(junit_path)
    if skipped:
        lines += ["## Skipped", ""] + [f"- `{name}`: {reason}" for name, reason in skipped] + [""]
    md_path = json_path.with_suffix(".md")
    md_path.write_text("\n".join(lines))
    png_path = json_path.with_suffix(".png")
    _plot(groups, png_path, json_path.stem)
    return md_path, png_path


def _plot(groups: dict[str, list[dict]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = sorted(groups)
    fig, axes = plt.subplots(len(names), 1, figsize=(9, 2.6 * len(names)), squeeze=False)
    for ax, group in zip(axes[:, 0], names):
        rows = groups[group]
        base = _baseline(rows)
        base_name = labels.label(base["contender"]) if base else "n/a"
        names_ = [labels.label(r["contender"]) for r in rows]
        times = [r["median_s"] / base["median_s"] if base else 0 for r in rows]
        mems = [
            (r["peak_mib"] / base["peak_mib"]) if base and base["peak_mib"] and r["peak_mib"] is not None else 0
            for r in rows
        ]
        xs = range(len(rows))
        ax.bar([x - 0.2 for x in xs], times, width=0.4, label=f"time / {base_name}")
        ax.bar([x + 0.2 for x in xs], mems, width=0.4, label=f"peak memory / {base_name}")
        ax.axhline(1.0, color="black", linewidth=0.8)
        positive = [r for r in times + mems if r > 0]
        ax.set_ylim(min(0.5, min(positive, default=1) / 1.5), max(2.0, max(positive, default=1) * 1.5))
        ax.set_xticks(list(xs), names_, fontsize=7)
        ax.set_yscale("log")
        ax.set_title(group, fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--report", type=Path, help="only render the table and plot of this JSON file")
    parser.add_argument("--tag", help="name of the result files (default: <device>-<date>)")
    args, pytest_args = parser.parse_known_args(argv)
    if args.report:
        junit = args.report.with_name(f".{args.report.stem}.junit.xml")
        paths = render(args.report, junit)
    else:
        tag = args.tag or f"{_device_tag()}-{dt.date.today().isoformat()}"
        paths = render(*run_suite(tag, pytest_args))
    for path in paths:
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
