"""Run by tests/test_trainer_fidelity.py under `accelerate launch` (two processes): one GRPO step of `sarkern train`'s
setup; each process writes what SAR scored locally (and rank 0 the logged metrics) to OUT/rank<N>.json."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sarkern.cli import _end_process_group, build_trainer, parse_options

out = Path(sys.argv[1])
quick = ["--max-completion-length", "24", "--prompts-per-step", "2", "--num-generations", "4", "--num-problems", "32"]
trainer = build_trainer(parse_options(["train", "--steps", "1", "--output-dir", str(out / "run"), *quick]))
local = {"ppl_cond": [], "ppl_uncond": [], "seconds": 0.0}
log_metrics = trainer._log_sar_metrics


def recorded(mode, scores, seconds, reused):
    # The scores SAR rewarded this process's completions with, before any reduction.
    local["ppl_cond"] = scores.ppl_cond[scores.valid].tolist()
    local["ppl_uncond"] = scores.ppl_uncond[scores.valid].tolist()
    local["seconds"] = seconds
    return log_metrics(mode, scores, seconds, reused)


trainer._log_sar_metrics = recorded
trainer.train()
rank = trainer.accelerator.process_index
(out / f"rank{rank}.json").write_text(json.dumps({**local, "log_history": trainer.state.log_history}))
_end_process_group()  # as `sarkern train` does: an exit-time teardown of the gloo group can abort the process
