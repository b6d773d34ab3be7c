"""What a study is: its reward configurations and the settings every run shares."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Reward configurations: `sarkern train` options on top of the shared settings.
CONFIGURATIONS: dict[str, dict[str, Any]] = {
    "correctness": {"reward": "none"},
    "sar-0.1": {"reward": "sar", "sar_weight": 0.1},
    "sar-0.2": {"reward": "sar", "sar_weight": 0.2},
    "sar-0.3": {"reward": "sar", "sar_weight": 0.3},
    "self-confidence": {"reward": "self_confidence", "sar_weight": 0.2},
    "o1-pruner": {"reward": "o1_pruner", "length_penalty_weight": 0.2},
    "efficient-reasoner": {"reward": "efficient_reasoner", "length_penalty_weight": 0.2},
}


@dataclass
class StudySettings:
    """What every run of the study shares. Resuming requires the same values (`SHARED_FIELDS`).

    The defaults are the committed CPU study's (sized to fit about an hour on a shared 2-core machine). The
    completion limit fits every answer style of the bundled model (the padded one reaches 153 tokens), so no reward
    is judged on cut-off answers; the learning rate is one at which correctness-only training leaves the bundled
    model's held-out accuracy where it was (1e-4 lowered it; see benchmarks/results/paper-study-2026-11-27.md)."""

    model: str | None = None  # None: the bundled tiny model
    dataset: str | None = None  # None: the synthetic arithmetic task
    eval_dataset: str | None = None  # None: held-out problems (synthetic test split, or a slice of --dataset)
    question_column: str = "question"
    answer_column: str = "answer"
    configs: list[str] = field(default_factory=lambda: list(CONFIGURATIONS))
    seeds: int = 3
    steps: int = 30
    prompts_per_step: int = 4
    num_generations: int = 8
    max_completion_length: int = 160
    learning_rate: float = 3e-5
    num_problems: int = 2000
    eval_problems: int = 200
    eval_samples: int = 2
    eval_max_new_tokens: int = 192
    ranking_problems: int = 100
    save_steps: int = 10
    bf16: bool = False
    note: str = ""


# Settings that change what a run computes: a resumed study must use the same ones.
SHARED_FIELDS = (
    "model",
    "dataset",
    "eval_dataset",
    "question_column",
    "answer_column",
    "steps",
    "prompts_per_step",
    "num_generations",
    "max_completion_length",
    "learning_rate",
    "num_problems",
    "eval_problems",
    "eval_samples",
    "eval_max_new_tokens",
    "ranking_problems",
    "bf16",
)


class StudyError(SystemExit):
    """Bad input (or a work directory the study cannot use); the CLI prints it as one line and exits 2."""

    def __init__(self, message: str):
        super().__init__(f"paper_study: error: {message}")


def flag(name: str) -> str:
    """The command-line flag of setting `name`."""
    return "--" + name.replace("_", "-")
