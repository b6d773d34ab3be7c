"""Everything the study is given, checked before it writes anything: a bad value is one line naming the option, the
minimum and why (exit 2), and the work directory stays as it was. The options it passes to `sarkern train` go
through `sarkern train`'s own checks (`sarkern.validation.check_option_values`); the study's own minimums follow
from what it computes."""

from __future__ import annotations

import datetime
import os
import re
from pathlib import Path
from typing import Any

from .ranking import WRONG_ANSWERS, ranking_shortfall
from .settings import CONFIGURATIONS, SHARED_FIELDS, StudyError, StudySettings, flag

# Why `sarkern train`'s minimums hold, said beside its message.
_TRAIN_WHY = {
    "num_generations": "GRPO's advantage compares each completion with the other completions of its prompt",
    "prompts_per_step": "every step trains on at least one prompt",
    "steps": "every run trains at least one step",
    "max_completion_length": "a completion holds at least its stop token",
    "save_steps": "a run saves a checkpoint every --save-steps steps, to resume from",
}
# The study's own integer settings: (minimum, maximum or None, why).
_STUDY_RANGES = {
    "seeds": (1, 2**32, "each configuration is trained once per seed 0..seeds-1, within numpy's seed range"),
    "eval_problems": (1, None, "accuracy and length are means over the held-out problems"),
    "eval_samples": (0, None, "it is the number of samples per held-out problem; 0 skips the sampled evaluation"),
    "eval_max_new_tokens": (1, None, "a held-out completion holds at least its stop token"),
}


def check_settings(settings: StudySettings, *, run_seeds: list[int] | None, date: str | None) -> None:
    """Option values alone (no file, no model): raises StudyError on the first bad one."""
    _check_configs(settings.configs)
    for name, (low, high, why) in _STUDY_RANGES.items():
        value = getattr(settings, name)
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise StudyError(f"{flag(name)} must be {bound}, got {value}: {why}")
    if settings.eval_dataset and not settings.dataset:
        raise StudyError("--eval-dataset needs --dataset (the synthetic task has its own held-out split)")
    _check_train_options(settings)
    if settings.dataset is None:
        _check_synthetic(settings)
    if run_seeds is not None:
        outside = sorted({s for s in run_seeds if not 0 <= s < settings.seeds})
        if outside:
            raise StudyError(
                f"--run-seeds names {', '.join(map(str, outside))}, not among the study's seeds "
                f"0..{settings.seeds - 1} (--seeds sets how many)"
            )
    if date is not None:
        try:
            datetime.date.fromisoformat(date)
        except ValueError:
            raise StudyError(f"--date must be YYYY-MM-DD (it names the report's files), got {date!r}") from None


def _check_configs(configs: list[str]) -> None:
    unknown = [c for c in configs if c not in CONFIGURATIONS]
    if unknown:
        raise StudyError(f"unknown configuration {unknown[0]!r}; choose from {', '.join(CONFIGURATIONS)}")
    repeated = sorted({c for c in configs if configs.count(c) > 1})
    if repeated:
        raise StudyError(
            f"--configs names {', '.join(repeated)} more than once; give each configuration once (each is trained "
            "once per seed)"
        )
    if not configs:
        raise StudyError("--configs needs at least one configuration")


def _check_train_options(settings: StudySettings) -> None:
    """Every run's `sarkern train` options, through `sarkern train`'s checks, in the study's words."""
    from sarkern.cli import TrainOptions
    from sarkern.validation import check_option_values

    for config in settings.configs:
        options = TrainOptions(
            model=settings.model,
            dataset=settings.dataset,
            question_column=settings.question_column,
            answer_column=settings.answer_column,
            num_problems=settings.num_problems,
            steps=settings.steps,
            seed=settings.seeds - 1,
            num_generations=settings.num_generations,
            prompts_per_step=settings.prompts_per_step,
            max_completion_length=settings.max_completion_length,
            learning_rate=settings.learning_rate,
            save_steps=settings.save_steps,
            bf16=settings.bf16,
            **CONFIGURATIONS[config],
        )
        try:
            check_option_values(options)
        except ValueError as err:
            message = str(err)
            name = re.match(r"option '(\w+)'", message)
            why = _TRAIN_WHY.get(name[1]) if name else None
            message = re.sub(r"option '(\w+)'", lambda m: flag(m[1]), message)
            raise StudyError(message + (f": {why}" if why else "")) from None


def _check_synthetic(settings: StudySettings) -> None:
    from sarkern.validation import MAX_SYNTHETIC_PROBLEMS

    for name in ("eval_problems", "ranking_problems"):
        if getattr(settings, name) > MAX_SYNTHETIC_PROBLEMS:
            raise StudyError(
                f"{flag(name)} must be <= {MAX_SYNTHETIC_PROBLEMS} (the synthetic task is generated in memory), "
                f"got {getattr(settings, name)}"
            )
    if settings.num_problems < settings.prompts_per_step:
        raise StudyError(
            f"--num-problems {settings.num_problems} is fewer than --prompts-per-step {settings.prompts_per_step}: "
            "each step draws that many distinct training problems"
        )
    n = settings.ranking_problems
    shortfall = ranking_shortfall(n) if n >= 1 else 0
    if shortfall is None:
        return
    why = (
        f"every problem's 'wrong' answers are the concise solutions of {WRONG_ANSWERS} other held-out problems with as "
        "many steps and another result"
    )
    smallest = smallest_ranking_problems()
    if n < smallest:
        raise StudyError(
            f"--ranking-problems must be >= {smallest}, got {n}: {why}, and the first {smallest - 1} held-out "
            "problems do not all have them"
        )
    raise StudyError(f"--ranking-problems {n}: held-out problem {shortfall + 1} lacks them ({why}); choose another")


def smallest_ranking_problems(limit: int = 1000) -> int:
    """The fewest held-out problems for which every problem has its wrong answers (12 for the synthetic task)."""
    for n in range(1, limit + 1):
        if ranking_shortfall(n) is None:
            return n
    raise RuntimeError(f"no count of ranking problems up to {limit} gives every problem its wrong answers")


def read_findings(path: str | None) -> str | None:
    if path is None:
        return None
    try:
        return Path(path).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        reason = getattr(err, "strerror", None) or str(err)
        raise StudyError(f"--findings-file {path}: cannot read it as UTF-8 text ({reason})") from None


def check_model(settings: StudySettings, held_out, train) -> None:
    """The model's config and tokenizer load, and every prompt leaves room for its completion within the model's
    positions: training prompts (a dataset's; the synthetic task's come from the held-out set's generator) for
    --max-completion-length, held-out prompts for --eval-max-new-tokens."""
    from transformers import AutoConfig, AutoTokenizer

    from sarkern.tiny import TINY_MODEL_DIR
    from sarkern.validation import prompt_lengths

    model_dir = Path(settings.model) if settings.model else Path(TINY_MODEL_DIR)
    if not model_dir.is_dir():
        raise StudyError(f"--model {model_dir} does not exist or is not a directory")
    try:
        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any failure here means the directory is not a usable model
        reason = " ".join(str(err).split())
        raise StudyError(f"--model {model_dir}: cannot read its config and tokenizer: {reason}") from None
    positions = getattr(config, "max_position_embeddings", None)
    if positions is None:
        return
    for rows, name, what in (
        (train, "max_completion_length", "training"),
        (held_out, "eval_max_new_tokens", "held-out"),
    ):
        room = positions - getattr(settings, name)
        if room < 1:
            raise StudyError(
                f"{flag(name)} {getattr(settings, name)} leaves no room for a prompt: the model has {positions} "
                "positions"
            )
        if rows is None:
            continue
        lengths = prompt_lengths(rows, tokenizer)
        longest = max(range(len(lengths)), key=lengths.__getitem__)
        if lengths[longest] > room:
            raise StudyError(
                f"{what} prompt {longest + 1} has {lengths[longest]} tokens, more than the {room} that the model's "
                f"{positions} positions leave beside {flag(name)} {getattr(settings, name)}; lower {flag(name)} or "
                "shorten the prompts"
            )


def check_writable(path: Path, what: str) -> None:
    """`path` is, or can be created as, a directory this process writes to (checked without writing)."""
    existing = Path(os.path.abspath(path))
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise StudyError(f"{what} {path}: {existing} exists and is not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise StudyError(f"{what} {path}: {existing} is not writable")


def check_resumable(stored: dict[str, Any], settings: StudySettings, inputs: dict[str, Any], workdir: Path) -> None:
    """A study already in `workdir` is resumed only with its settings and the same input files (by digest)."""
    held = stored.get("settings", {})
    changed = [k for k in SHARED_FIELDS if held.get(k) != getattr(settings, k)]
    if changed:
        detail = ", ".join(f"{k}: {held.get(k)!r} -> {getattr(settings, k)!r}" for k in changed)
        raise StudyError(
            f"{workdir} holds a study with other settings ({detail}); resume it with the same settings or choose "
            "another --workdir"
        )
    for name, now in inputs.items():
        then = stored.get("inputs", {}).get(name)
        if then is not None and then["sha256"] != now["sha256"]:
            raise StudyError(
                f"{flag(name)} {now['path']} changed since the study in {workdir} started (sha256 {then['sha256']} "
                f"then, {now['sha256']} now): its finished runs and new ones would use different data; restore "
                "the file, or start a new study with another --workdir"
            )
