"""Run the real `sarkern train` (`sarkern.cli.main`) with one fault injected at a named moment.

    python tests/fault_injection.py FAULT STEP train [options...]

FAULT (STEP is the training step it happens at):
- kill-after-step: SIGKILL right after the step's metrics line is written;
- kill-in-checkpoint: SIGKILL while the step's checkpoint is being written (model saved, optimizer and trainer state
  not yet);
- interrupt-in-checkpoint: SIGINT (Ctrl-C) at that same moment;
- interrupt-after-step: SIGINT right after the step's metrics line is written;
- torn-metrics: write the first half of the step's metrics line, then SIGKILL (a crash mid-write);
- hold-after-step: after the step, create `<output_dir>/.hold-reached` and wait until `.hold-release` appears.

The hooks wrap the methods the moments belong to, so the fault always happens at the same point of the run.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from pathlib import Path

from transformers import Trainer

from sarkern import cli
from sarkern.metrics import MetricsCallback


def _output_dir(argv: list[str]) -> Path:
    return Path(argv[argv.index("--output-dir") + 1])


def install(fault: str, step: int, output_dir: Path) -> None:
    on_log = MetricsCallback.on_log
    save_optimizer = Trainer._save_optimizer_and_scheduler

    def on_log_with_fault(self, args, state, control, logs=None, **kwargs):
        at_step = state.global_step == step and logs and "reward" in logs
        if fault == "torn-metrics" and at_step:
            line = json.dumps({"step": state.global_step, **logs})
            with self.path.open("a") as handle:
                handle.write(line[: len(line) // 2])
            os.kill(os.getpid(), signal.SIGKILL)
        on_log(self, args, state, control, logs=logs, **kwargs)
        if not at_step:
            return
        if fault == "kill-after-step":
            os.kill(os.getpid(), signal.SIGKILL)
        elif fault == "interrupt-after-step":
            os.kill(os.getpid(), signal.SIGINT)
        elif fault == "hold-after-step":
            (output_dir / ".hold-reached").touch()
            while not (output_dir / ".hold-release").exists():
                time.sleep(0.05)

    def save_optimizer_with_fault(self, checkpoint_dir):
        if self.state.global_step == step and fault == "kill-in-checkpoint":
            os.kill(os.getpid(), signal.SIGKILL)
        if self.state.global_step == step and fault == "interrupt-in-checkpoint":
            os.kill(os.getpid(), signal.SIGINT)
        return save_optimizer(self, checkpoint_dir)

    MetricsCallback.on_log = on_log_with_fault
    Trainer._save_optimizer_and_scheduler = save_optimizer_with_fault


if __name__ == "__main__":
    fault, step, argv = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    install(fault, step, _output_dir(argv))
    sys.exit(cli.main(argv))
