"""Run by tests/test_sharded_training.py under `accelerate launch` with an engine's config (two CPU processes): two
GRPO steps of `sarkern train`'s setup. Every SAR scoring call is recorded on each process (its inputs and scores) with
the weights it scored with, read inside the engine's gathering, in OUT/rank<N>.json and OUT/rank<N>-call<K>.pt."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from sarkern.cli import _end_process_group, build_trainer, parse_options
from sarkern.sharding import detect_engine

out = Path(sys.argv[1])
quick = ["--max-completion-length", "16", "--prompts-per-step", "2", "--num-generations", "4", "--num-problems", "16"]
trainer = build_trainer(parse_options(["train", "--steps", "2", "--output-dir", str(out / "run"), *quick]))
rank = trainer.accelerator.process_index
engine_at_construction = detect_engine(trainer.model)  # ZeRO-3 partitions at load (zero.Init); FSDP2 at prepare
scorer = trainer.sar_scorer
score = scorer.score
calls = []


def as_lists(ids):
    return [list(map(int, row)) for row in ids]


def recorded(prompt_ids, completion_ids, *, cond_logprobs=None, placeholder_ids=None, **kwargs):
    scores = score(prompt_ids, completion_ids, cond_logprobs=cond_logprobs, placeholder_ids=placeholder_ids, **kwargs)
    # Inside the engine's gathering: every parameter is whole here, and these are the weights SAR scored with.
    weights = {name: p.detach().clone() for name, p in scorer.model.named_parameters()}
    torch.save(weights, out / f"rank{rank}-call{len(calls)}.pt")
    calls.append(
        {
            "step": trainer.state.global_step,
            "prompt_ids": as_lists(prompt_ids),
            "completion_ids": as_lists(completion_ids),
            "placeholder_ids": as_lists(placeholder_ids),
            "cond_given": cond_logprobs is not None,
            **{field: getattr(scores, field).tolist() for field in ("reward", "ppl_cond", "ppl_uncond", "valid")},
        }
    )
    return scores


scorer.score = recorded
trainer.train()
(out / f"rank{rank}.json").write_text(
    json.dumps(
        {
            "distributed_type": str(trainer.accelerator.distributed_type),
            "engine": detect_engine(scorer.model),
            "engine_at_construction": engine_at_construction,
            "num_processes": trainer.accelerator.num_processes,
            "calls": calls,
            "log_history": trainer.state.log_history,
        }
    )
)
_end_process_group()  # as `sarkern train` does: an exit-time teardown of the gloo group can abort the process
