"""Per-step metrics of a training run: a JSONL file that survives resumes, a table on the console, and a plot."""

from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

# Columns of the console table: (header, key in the logs, format).
TABLE_COLUMNS = (
    ("step", "step", "{:>7d}"),
    ("reward", "reward", "{:>7.3f}"),
    ("correct", "rewards/correctness/mean", "{:>7.3f}"),
    ("sar", "rewards/sar/mean", "{:>7.3f}"),
    ("length", "completions/mean_length", "{:>7.1f}"),
    ("ppl|q", "sar/ppl_cond", "{:>7.3f}"),
    ("ppl", "sar/ppl_uncond", "{:>7.3f}"),
    ("sar %", "sar/step_share", "{:>7.1%}"),
)


def _format(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-".rjust(7)
    return fmt.format(value)


class MetricsCallback(TrainerCallback):
    """Appends each training log to `metrics.jsonl` and prints it as a table row.

    On resume, lines logged after the checkpoint being resumed are dropped first, so the finished file holds each
    step exactly once, as an uninterrupted run would have written it.
    """

    def __init__(self, path: str | Path, print_table: bool = True):
        self.path = Path(path)
        self.print_table = print_table
        self._header_printed = False

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero or not self.path.exists():
            return
        kept = [r for r in read_metrics(self.path) if r.get("step", 0) <= state.global_step]
        # A new file renamed over the old one: a kill here leaves one or the other, never half of it.
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, self.path)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not state.is_world_process_zero or not logs or "reward" not in logs:
            return  # only the per-step training logs, not the end-of-training summary
        record = {"step": state.global_step, "epoch": state.epoch, **logs}
        # One write() of the whole line on an O_APPEND descriptor: a crash leaves at most a torn last line.
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(record) + "\n").encode())
        finally:
            os.close(fd)
        if self.print_table:
            if not self._header_printed:
                tqdm.write(" ".join(h.rjust(7) for h, _, _ in TABLE_COLUMNS))
                self._header_printed = True
            tqdm.write(" ".join(_format(record.get(key), fmt) for _, key, fmt in TABLE_COLUMNS))


class QuietProgressCallback(ProgressCallback):
    """transformers' progress bar without its dump of every log dict (the metrics table shows the step)."""

    def on_log(self, args, state, control, logs=None, **kwargs):
        return


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics JSONL file. A line a crash tore (cut off mid-write) is left out with a warning;
    the next resume rewrites the file without it."""
    records = []
    for number, line in enumerate(Path(path).read_text(errors="replace").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            record = None
        if not isinstance(record, dict):
            warnings.warn(
                f"{path}: line {number} is not a complete JSON record (torn by a crash mid-write?); left out",
                RuntimeWarning,
                stacklevel=2,
            )
            continue
        records.append(record)
    return records


# Panels of metrics.png: (title, key in the logs). SAR's own panels are drawn when the run logged them.
PLOT_PANELS = (
    ("reward", "reward"),
    ("accuracy", "rewards/correctness/mean"),
    ("completion length (tokens)", "completions/mean_length"),
    ("SAR reward", "rewards/sar/mean"),
    ("ppl(a|q)", "sar/ppl_cond"),
    ("ppl(a) (placeholder)", "sar/ppl_uncond"),
)


def moving_average(values: list[float], window: int) -> list[float]:
    """Trailing mean over the last ``window`` finite values (NaN, i.e. not logged, are skipped; NaN until one is
    seen)."""
    out, recent = [], []
    for value in values:
        if value is not None and math.isfinite(value):
            recent.append(value)
            recent = recent[-window:]
        out.append(sum(recent) / len(recent) if recent else math.nan)
    return out


def plot_metrics(path: str | Path, out: str | Path, window: int | None = None) -> Path:
    """Reward, accuracy, completion length and, when logged, SAR's reward, ``ppl(a|q)`` and ``ppl(a)`` against step,
    from a metrics JSONL file: each step as a faint point, and a trailing moving average over ``window`` steps
    (default: a tenth of the run, at least 1) as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(path)
    steps = [r["step"] for r in records]
    window = window or max(1, len(records) // 10)
    panels = [(title, key) for title, key in PLOT_PANELS if any(key in r for r in records)]
    columns = 3
    rows = max(1, math.ceil(len(panels) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(12, 3.2 * rows), squeeze=False)
    for ax, (title, key) in zip(axes.flat, panels):
        values = [r.get(key) if r.get(key) is not None else math.nan for r in records]
        ax.plot(steps, values, ".", alpha=0.3, color="tab:blue", label="per step")
        ax.plot(steps, moving_average(values, window), "-", color="tab:blue", label=f"mean of {window} steps")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.set_visible(False)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return Path(out)
