"""The report of one run: its sections and measurements, written as JSON and markdown after each of them."""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .render import render
from .settings import Settings
from .targets import evaluate_targets
from .timing import Device, outcome_of, time_limit


@dataclass
class Run:
    settings: Settings
    device: Device
    out: Path
    tag: str
    started: float = field(default_factory=time.monotonic)
    data: dict = field(default_factory=dict)
    section_started: float = 0.0
    section_budget: float = 0.0
    child: bool = False  # a section's own process (see run_section_process): the parent owns the wall time

    def remaining(self) -> float:
        """Seconds left in the current section, capped by what is left of the whole run."""
        now = time.monotonic()
        return min(self.section_budget - (now - self.section_started), self.settings.total_s - (now - self.started))

    @contextlib.contextmanager
    def section(self, name: str):
        self.section_started, self.section_budget = time.monotonic(), self.settings.budgets[name]
        record = {"status": "running", "budget_s": self.section_budget}
        self.data.setdefault("sections", {})[name] = record
        print(f"\n== {name} (budget {self.section_budget:.0f} s)", flush=True)
        try:
            with time_limit(self.remaining()):
                yield
            record["status"] = "ok"
        except Exception as error:  # one failing section never loses the others
            record.update(outcome_of(error))
            if record["status"] == "error":
                record["status"] = "failed"
            print(f"   section {name}: {record['status']}: {record.get('reason')}", flush=True)
        finally:
            record["seconds"] = round(time.monotonic() - self.section_started, 2)
            self.device.free()
            self.write()

    def measure(self, what: str, fn: Callable[[], dict]) -> dict:
        """One measurement inside the section's remaining budget; its failure becomes its row's status.

        The report is written first, so a section process killed in this measurement leaves the ones before it."""
        self.write()
        try:
            with time_limit(self.remaining()):
                row = {"status": "ok", **fn()}
        except Exception as error:
            row = outcome_of(error)
        finally:
            self.device.free()
        shown = {k: v for k, v in row.items() if k in ("status", "median_ms", "peak_extra_mib", "reason", "check")}
        print(f"   {what}: {json.dumps(shown, default=str)[:400]}", flush=True)
        return row

    def write(self) -> None:
        """The JSON, then the markdown rendered from it; never raises (a rendering bug must not cost the data)."""
        if not self.child:
            self.data["wall_s"] = round(time.monotonic() - self.started, 1)
        self.out.mkdir(parents=True, exist_ok=True)
        try:
            self.data["targets"] = evaluate_targets(self.data, self.settings)
        except Exception as error:
            note = outcome_of(error)["reason"]
            self.data["targets"] = [
                {
                    "what": "(evaluating the targets)",
                    "limit": None,
                    "better": "lower",
                    "ratio": None,
                    "status": "error",
                    "note": note,
                }
            ]
        write_atomic(self.out / f"{self.tag}.json", json.dumps(self.data, indent=2, default=str) + "\n")
        try:
            text = render(self)
        except Exception as error:
            text = f"# gpu-check: {self.tag}\n\nRendering failed ({outcome_of(error)['reason']}); see the .json.\n"
        write_atomic(self.out / f"{self.tag}.md", text)


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)
