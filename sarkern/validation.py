"""Everything `sarkern train` is given, checked before the first step: option types and ranges, prompt lengths
against the model, answers the correctness reward can verify. Each check raises `ValueError` with a message that
names the option, or the dataset row, and what to do; the CLI prints it as one line."""

from __future__ import annotations

import math
import re
from dataclasses import fields
from typing import Any

# The synthetic task is generated in memory up front (about 60 microseconds and 1 KiB per problem).
MAX_SYNTHETIC_PROBLEMS = 100_000
_INTEGER_RANGES = {  # option: (minimum, maximum or None)
    "steps": (1, None),
    "num_problems": (1, MAX_SYNTHETIC_PROBLEMS),
    "num_generations": (2, None),  # GRPO's advantages compare completions within a group
    "prompts_per_step": (1, None),
    "max_completion_length": (1, None),
    "num_iterations": (1, None),
    "gradient_accumulation_steps": (1, None),
    "save_steps": (1, None),
    "seed": (0, 2**32 - 1),  # numpy's seed range
}
# YAML 1.1 (PyYAML) reads `1e-4` as a string: accept number-shaped strings for float options.
_NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?")


def _describe(value: Any) -> str:
    return f"{type(value).__name__} {value!r}"


def coerce_option(name: str, value: Any, kind: str) -> Any:
    """`value` (from a YAML file) as the type of option `name`, or a ValueError naming the option."""
    optional = kind.endswith("| None")
    base = kind.split("|")[0].strip()
    if value is None and optional:
        return None
    if base == "bool":
        if isinstance(value, bool):
            return value
        raise ValueError(f"option {name!r} must be true or false, got {_describe(value)}")
    if base == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ValueError(f"option {name!r} must be an integer, got {_describe(value)}")
    if base == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            return float(value)
        raise ValueError(f"option {name!r} must be a number, got {_describe(value)}")
    if base == "str":
        if isinstance(value, str):
            return value
        raise ValueError(f"option {name!r} must be a string, got {_describe(value)}")
    raise TypeError(f"no rule for options of type {kind}")  # a new option type needs a rule here


def check_option_values(options) -> None:
    """Types (whatever set them) and ranges of every option of a `TrainOptions`."""
    from .ops import check_temperature

    for f in fields(options):
        coerce_option(f.name, getattr(options, f.name), str(f.type))
    for name, (low, high) in _INTEGER_RANGES.items():
        value = getattr(options, name)
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise ValueError(f"option {name!r} must be {bound}, got {value}")
    for name in ("learning_rate", "sar_weight", "correctness_weight", "length_penalty_weight", "beta"):
        if not math.isfinite(getattr(options, name)):
            raise ValueError(f"option {name!r} must be a finite number, got {getattr(options, name)}")
    if options.learning_rate <= 0:
        raise ValueError(f"option 'learning_rate' must be > 0, got {options.learning_rate}")
    if options.beta < 0:
        raise ValueError(f"option 'beta' must be >= 0, got {options.beta}")
    try:
        check_temperature(options.temperature)
    except ValueError as err:
        raise ValueError(f"option 'temperature': {err}") from None
    for name in ("question_column", "answer_column", "output_dir"):
        if not getattr(options, name).strip():
            raise ValueError(f"option {name!r} must not be empty")


# ------------------------------------------------------------------------------------------------------ dataset


def prompt_lengths(dataset, tokenizer) -> list[int]:
    """Token count of each row's prompt as TRL's GRPOTrainer tokenizes it (chat template, generation prompt)."""
    lengths = []
    for prompt in dataset["prompt"]:
        if isinstance(prompt, str):
            ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        else:
            ids = tokenizer.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
            if isinstance(ids, dict) or hasattr(ids, "keys"):
                ids = ids["input_ids"]
        lengths.append(len(ids))
    return lengths


def fit_prompts(
    dataset,
    tokenizer,
    *,
    max_positions: int | None,
    max_completion_length: int,
    drop: bool,
    placeholder: str | None = None,
    chat_template_kwargs: dict | None = None,
):
    """`dataset` with every prompt that leaves room for `max_completion_length` tokens within the model's
    `max_positions`; a prompt that does not is an error naming its row, or, with `drop`, left out (returns the
    dataset and how many rows were dropped).

    With `placeholder` (the SAR preset the scorer will use), each row's placeholder prompt must leave that room too:
    SAR scores every completion after it. A placeholder shared by the rows (the paper's, or the template's without
    a system message) that does not fit is an error whatever `drop` says; one built from a row's own system
    message counts as that row's."""
    if max_positions is None:
        return dataset, 0
    if max_completion_length >= max_positions:
        raise ValueError(
            f"option 'max_completion_length' ({max_completion_length}) leaves no room for a prompt: the model has "
            f"{max_positions} positions"
        )
    room = max_positions - max_completion_length
    lengths = prompt_lengths(dataset, tokenizer)
    what = ["a prompt"] * len(lengths)
    if placeholder is not None:
        placeholder_lengths = _placeholder_lengths(
            dataset, tokenizer, placeholder, chat_template_kwargs, room=room, positions=max_positions
        )
        for row, length in enumerate(placeholder_lengths):
            if length > lengths[row]:
                lengths[row], what[row] = length, "a SAR placeholder prompt (its system message kept)"
    too_long = [i for i, n in enumerate(lengths) if n > room]
    if not too_long:
        return dataset, 0
    if not drop:
        first = too_long[0]
        raise ValueError(
            f"dataset row {first + 1} has {what[first]} of {lengths[first]} tokens, more than the {room} that the "
            f"model's {max_positions} positions leave beside max_completion_length {max_completion_length}"
            + (f" ({len(too_long)} such rows in all)" if len(too_long) > 1 else "")
            + "; shorten them, or pass --drop-long-prompts to leave them out"
        )
    keep = sorted(set(range(len(lengths))) - set(too_long))
    return dataset.select(keep), len(too_long)


def _placeholder_lengths(dataset, tokenizer, preset: str, chat_template_kwargs, *, room: int, positions: int):
    """The length of the placeholder prompt SAR scores each row's completions after (`PlaceholderPrompts`, as the
    scorer builds them); the shared placeholder, when a row uses it and it is longer than `room`, is refused here,
    naming the preset."""
    from .placeholder import PlaceholderPrompts

    placeholders = PlaceholderPrompts(tokenizer, preset=preset, chat_template_kwargs=chat_template_kwargs)
    per_row = placeholders.for_prompts(dataset["prompt"])
    shared = len(placeholders.default)
    if shared > room and any(ids == placeholders.default for ids in per_row):
        raise ValueError(
            f"SAR's placeholder prompt (--placeholder {preset}) is {shared} tokens, more than the {room} that the "
            f"model's {positions} positions leave beside max_completion_length {positions - room}: lower "
            f"--max-completion-length by at least {shared - room}"
            + (", or use --placeholder template" if preset == "paper" else "")
        )
    return [len(ids) for ids in per_row]


def check_answers_verifiable(answers, *, text_answers: bool = False) -> None:
    """Refuse reference answers the correctness reward could never match, which would train on a reward of 0
    throughout: empty ones, ones a completion ending in `answer: <the answer>` would not match (multi-line text,
    say), and, unless `text_answers`, ones math-verify cannot parse (a number or a LaTeX expression is needed;
    `text_answers` accepts free text compared verbatim, e.g. multiple-choice letters)."""
    from .rewards import _parse, _timeout, answers_match, extract_final_answer
    from .tasks import format_final_answer

    timeout = _timeout()
    for row, answer in enumerate(answers, start=1):
        text = str(answer).strip()
        if not text:
            raise ValueError(f"dataset row {row} has an empty answer")
        shown = text if len(text) <= 60 else text[:57] + "..."
        if not text_answers and not _parse(text, timeout):
            raise ValueError(
                f"dataset row {row} has the answer {shown!r}, which math-verify cannot parse (a number or a LaTeX "
                "expression is needed); pass --text-answers if your answers are text to match verbatim"
            )
        if not answers_match(extract_final_answer(format_final_answer(text)), text):
            raise ValueError(
                f"dataset row {row} has the answer {shown!r}, which no completion could match: even one ending in "
                f"{format_final_answer(shown)!r} is not rewarded as correct"
            )
