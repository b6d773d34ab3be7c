"""Reasoning tasks: a seeded synthetic arithmetic task and a loader for local question/answer files.

Both produce a `datasets.Dataset` in TRL's conversational format: a `prompt` column holding a list of chat messages
(`[{"role": "user", "content": question}]`, optionally preceded by a system message) and an `answer` column holding
the reference answer as a string. TRL hands every dataset column except `prompt` to the reward functions as keyword
arguments, which is how `sarkern.rewards` sees the reference `answer`.

The synthetic task
------------------
Word problems about a person and a count of objects, solved by a chain of two or three small integer operations::

    question: "tom has 3 boxes of 8 pens. he gives away 7. how many pens does he have now?"
    answer:   "17"

Everything is generated from a seed with a private `random.Random`, so the same seed always gives the same problems
on any machine. The text uses only lowercase letters, digits, spaces and `. , : ? + - * =`, which suits the
character-level tokenizer of the bundled tiny model. Amounts and factors are single digits and every count stays in
0..99, so each step is arithmetic a tiny model learns in minutes on a CPU.

Problems are split into a train and a test part by a stable hash of the question text, not by seed: a test problem can
never be generated as a train problem, whatever seeds the two sides use.

Each problem can write out its solution at several verbosities (`ArithmeticProblem.solution`): concise equations,
equations with a restatement of the count after each step, and a padded, repetitive version that restates every
count and then re-checks every equation. All end with the final-answer marker `answer: N` that
`sarkern.rewards.correctness_reward` reads. The tiny model is trained on a mixture of them, so its completions vary in
length for a length-aware reward (SAR, O1-pruner, Efficient-Reasoner) to act on.
"""

from __future__ import annotations

import hashlib
import json
import numbers
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any, Literal

from datasets import Dataset

Split = Literal["train", "test"]

ANSWER_MARKER = "answer:"
"""Marks the final answer in a completion (`answer: 42`); see `format_final_answer`."""

TEST_FRACTION_PERCENT = 10
"""Share of the problem space (by question hash) that belongs to the test split."""

MAX_VALUE = 99
"""Upper bound of every count, intermediate or final, in the synthetic task."""

_PEOPLE: tuple[tuple[str, str], ...] = (
    ("tom", "he"),
    ("sam", "he"),
    ("ben", "he"),
    ("max", "he"),
    ("leo", "he"),
    ("ann", "she"),
    ("mia", "she"),
    ("eva", "she"),
    ("zoe", "she"),
    ("lily", "she"),
)
_ITEMS: tuple[str, ...] = ("pens", "apples", "cards", "books", "eggs", "coins", "cups", "shells")
_GAIN_VERBS: tuple[str, ...] = ("buys", "gets", "finds")
_LOSS_VERBS: tuple[str, ...] = ("gives away", "loses", "sells")
_CONTAINERS: tuple[str, ...] = ("boxes", "bags", "packs")


def format_final_answer(answer: int | str) -> str:
    """The line that ends every synthetic solution and that the correctness reward looks for first."""
    return f"{ANSWER_MARKER} {answer}"


class Verbosity(IntEnum):
    """How much a written solution says beyond the equations."""

    CONCISE = 0
    """Only the equations: `3*8=24. 24-7=17. answer: 17`."""
    RESTATED = 1
    """Each equation followed by the count it gives: `3*8=24. so tom has 24 pens. ...`."""
    PADDED = 2
    """The restated solution, then every equation again as a check: long and repetitive, same answer."""


@dataclass(frozen=True)
class _Calculation:
    equation: str  # "36-7=29"
    state: str  # "so tom has 29 pens."


@dataclass(frozen=True)
class _Step:
    fact: str  # the sentence of the question this step comes from, e.g. "he gives away 7."
    calculations: tuple[_Calculation, ...]


@dataclass(frozen=True)
class ArithmeticProblem:
    """One synthetic word problem with its structured solution."""

    question: str
    answer: int
    steps: tuple[_Step, ...]

    @property
    def equations(self) -> tuple[str, ...]:
        """The solution's equations in order, e.g. `("3*8=24", "24-7=17")`."""
        return tuple(c.equation for step in self.steps for c in step.calculations)

    def solution(self, verbosity: Verbosity | int = Verbosity.CONCISE) -> str:
        """Write the solution out at the given verbosity; it always ends with `answer: N`."""
        verbosity = Verbosity(verbosity)
        final = format_final_answer(self.answer)
        if verbosity is Verbosity.CONCISE:
            return " ".join(f"{eq}." for eq in self.equations) + " " + final
        parts = [f"{c.equation}. {c.state}" for step in self.steps for c in step.calculations]
        if verbosity is Verbosity.PADDED:
            parts.append("let me check: " + " ".join(f"{eq}." for eq in self.equations) + " yes.")
        return " ".join(parts) + " " + final


def _question_bucket(question: str) -> int:
    """Stable bucket in 0..99 of a question (Python's `hash` is salted per process, so it would not do)."""
    return int.from_bytes(hashlib.sha256(question.encode("utf-8")).digest()[:4], "big") % 100


def problem_split(question: str) -> Split:
    """Which split a question belongs to; fixed by its text alone."""
    return "test" if _question_bucket(question) < TEST_FRACTION_PERCENT else "train"


def _sample_problem(rng: random.Random, num_equations: int) -> ArithmeticProblem | None:
    """Draw one problem with exactly `num_equations` equations, or None if the draw went out of range."""
    name, pronoun = rng.choice(_PEOPLE)
    item = rng.choice(_ITEMS)
    steps: list[_Step] = []

    def state(value: int) -> str:
        return f"so {name} has {value} {item}."

    # Opening: a plain count, or containers of a count (one multiplication).
    if rng.random() < 0.5:
        count = rng.randint(2, 30)
        opening = f"{name} has {count} {item}."
        steps.append(_Step(opening, ()))  # no calculation, but the padded solution restates it
    else:
        boxes, per_box = rng.randint(2, 5), rng.randint(2, 9)
        container = rng.choice(_CONTAINERS)
        opening = f"{name} has {boxes} {container} of {per_box} {item}."
        count = boxes * per_box
        steps.append(_Step(opening, (_Calculation(f"{boxes}*{per_box}={count}", state(count)),)))

    used = sum(len(step.calculations) for step in steps)
    while used < num_equations:
        remaining = num_equations - used
        kinds = ["gain", "loss"] + (["gain_groups"] if remaining >= 2 else [])
        kind = rng.choice(kinds)
        if kind == "loss" and count < 4:
            kind = "gain"
        if kind == "gain":
            amount = rng.randint(2, 9)
            new = count + amount
            fact = f"{pronoun} {rng.choice(_GAIN_VERBS)} {amount} more."
            calcs = (_Calculation(f"{count}+{amount}={new}", state(new)),)
        elif kind == "loss":
            amount = rng.randint(2, min(9, count - 1))
            new = count - amount
            fact = f"{pronoun} {rng.choice(_LOSS_VERBS)} {amount}."
            calcs = (_Calculation(f"{count}-{amount}={new}", state(new)),)
        else:  # gain_groups: a multiplication, then an addition
            groups, per_group = rng.randint(2, 4), rng.randint(2, 9)
            extra = groups * per_group
            new = count + extra
            container = rng.choice(_CONTAINERS)
            fact = f"{pronoun} {rng.choice(_GAIN_VERBS)} {groups} {container} of {per_group} more."
            calcs = (
                _Calculation(f"{groups}*{per_group}={extra}", f"so {pronoun} gets {extra} more."),
                _Calculation(f"{count}+{extra}={new}", state(new)),
            )
        if new > MAX_VALUE:
            return None
        steps.append(_Step(fact, calcs))
        count = new
        used += len(calcs)

    question = " ".join(step.fact for step in steps) + f" how many {item} does {pronoun} have now?"
    return ArithmeticProblem(question=question, answer=count, steps=tuple(steps))


def generate_problems(
    n: int,
    seed: int = 0,
    *,
    split: Split = "train",
    min_steps: int = 2,
    max_steps: int = 3,
) -> list[ArithmeticProblem]:
    """Generate `n` distinct synthetic problems of `split`, deterministically from `seed`.

    `min_steps`..`max_steps` bounds the number of equations of each solution (uniform over that range).
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if not 1 <= min_steps <= max_steps:
        raise ValueError(f"need 1 <= min_steps <= max_steps, got {min_steps} and {max_steps}")
    # The split name is part of the seed so that train and test draws are independent streams.
    rng = random.Random(f"sarkern-arithmetic/{split}/{seed}")
    problems: list[ArithmeticProblem] = []
    seen: set[str] = set()
    attempts, max_attempts = 0, 1000 * max(n, 1)
    while len(problems) < n:
        attempts += 1
        if attempts > max_attempts:  # only reachable with absurd n: the problem space has millions of questions
            raise RuntimeError(f"could not generate {n} distinct {split} problems")
        problem = _sample_problem(rng, rng.randint(min_steps, max_steps))
        if problem is None or problem.question in seen or problem_split(problem.question) != split:
            continue
        seen.add(problem.question)
        problems.append(problem)
    return problems


def make_prompt(question: str, system_prompt: str | None = None) -> list[dict[str, str]]:
    """A conversational prompt (TRL format) asking `question`, with an optional system message first."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": question})
    return messages


def with_paper_prompts(dataset: Dataset, tokenizer: Any, chat_template_kwargs: dict | None = None) -> Dataset:
    """`dataset` with each prompt rebuilt as the official SAR code builds its prompts from the question
    (`sarkern.placeholder.paper_prompt`): the paper's system prompt, then the question (a system turn, or in the user
    turn for templates without a system role), or the official plain text for a tokenizer without a chat template.

    The question is the prompt's user message; a prompt with anything else (its own system message, several turns)
    is refused, since the paper's prompt has room for nothing else."""
    from .placeholder import paper_prompt

    prompts = []
    for row, prompt in enumerate(dataset["prompt"], start=1):
        roles = [m.get("role") for m in prompt] if isinstance(prompt, list) else None
        if roles != ["user"] or not isinstance(prompt[0].get("content"), str):
            raise ValueError(
                f"dataset row {row}: the paper's prompts are its system prompt and one question, but this prompt is "
                f"{roles or type(prompt).__name__}; give one user message per row, or use --placeholder template"
            )
        prompts.append(paper_prompt(tokenizer, prompt[0]["content"], chat_template_kwargs=chat_template_kwargs))
    others = {name: dataset[name] for name in dataset.column_names if name != "prompt"}
    return Dataset.from_dict({"prompt": prompts, **others})


def synthetic_arithmetic_dataset(
    n: int = 1000,
    seed: int = 0,
    *,
    split: Split = "train",
    min_steps: int = 2,
    max_steps: int = 3,
    system_prompt: str | None = None,
) -> Dataset:
    """The synthetic task as a `Dataset` with columns `prompt` (chat messages) and `answer` (the number as text)."""
    problems = generate_problems(n, seed, split=split, min_steps=min_steps, max_steps=max_steps)
    return Dataset.from_dict(
        {
            "prompt": [make_prompt(p.question, system_prompt) for p in problems],
            "answer": [str(p.answer) for p in problems],
        }
    )


# ----------------------------------------------------------------------------------------------------------------------
# Local question/answer files
# ----------------------------------------------------------------------------------------------------------------------


class DatasetFormatError(ValueError):
    """A dataset file cannot be used: unreadable, unknown format, or without the expected columns."""


_GSM8K_MARKER = "####"


def extract_gsm8k_answer(text: str) -> str:
    """The final answer of a GSM8K-style solution (`... #### 1,234` -> `1234`); text without `####` is returned
    stripped.

    GSM8K writes the worked solution, then `#### ` and the final answer, exactly once; thousands separators are removed
    so that the answer compares as a number. Raises `ValueError` for a `####` with nothing after it (the answer is
    missing: a number of the worked solution is not it) and for several `####` (which one is final is a guess).
    """
    text = str(text).strip()
    markers = text.count(_GSM8K_MARKER)
    if markers == 0:
        return text
    if markers > 1:
        raise ValueError(
            f"has {markers} '####' final-answer markers; GSM8K has one, before the final answer: keep only that one"
        )
    answer = text.split(_GSM8K_MARKER, 1)[1].strip()
    if not answer:
        raise ValueError("ends in '####' with no final answer after it; write the answer after '#### '")
    # Only drop commas between digits: "1,234" -> "1234", but leave e.g. "(1, 2)" alone.
    return re.sub(r"(?<=\d),(?=\d{3}\b)", "", answer)


class _DuplicateKey(ValueError):
    def __init__(self, key: str) -> None:
        super().__init__(key)
        self.key = key


def _refuse_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """`json` keeps the last of two equal keys silently; a row with two answers is a broken row, not the second one."""
    record: dict[str, Any] = {}
    for key, value in pairs:
        if key in record:
            raise _DuplicateKey(key)
        record[key] = value
    return record


def _parse_json(text: str, path: Path, where: str) -> Any:
    try:
        return json.loads(text, object_pairs_hook=_refuse_duplicate_keys)
    except _DuplicateKey as err:
        raise DatasetFormatError(
            f"{path}: {where} has the key {err.key!r} twice; JSON keeps only one of them silently: remove the other"
        ) from None


def _read_records(path: Path) -> list[dict[str, Any]] | Dataset:
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".json"):
        text = path.read_text(encoding="utf-8-sig")  # a UTF-8 byte-order mark (Windows editors) is not content
        if suffix == ".json" and text.lstrip().startswith("["):
            records = _parse_json(text, path, "the JSON array")  # a JSON array of objects
            if not all(isinstance(record, dict) for record in records):
                raise DatasetFormatError(f"{path}: expected a JSON array of objects")
            return records
        records = []
        for line_number, line in enumerate(text.split("\n"), start=1):  # not splitlines: JSON text may hold U+2028
            if not line.strip():
                continue
            try:
                record = _parse_json(line, path, f"line {line_number}")
            except json.JSONDecodeError as err:
                raise DatasetFormatError(
                    f"{path}: line {line_number} is not valid JSON ({err.msg}); expected one JSON object per line"
                ) from err
            if not isinstance(record, dict):
                raise DatasetFormatError(f"{path}: line {line_number} is not a JSON object")
            records.append(record)
        return records
    if suffix == ".parquet":
        return Dataset.from_parquet(str(path))
    raise DatasetFormatError(
        f"{path}: unknown dataset file extension {suffix or '(none)'!r}; expected .jsonl, .json or .parquet"
    )


def load_qa_file(
    path: str | Path,
    *,
    question_column: str = "question",
    answer_column: str = "answer",
    system_prompt: str | None = None,
) -> Dataset:
    """Load questions and answers from a local JSONL or Parquet file into the task format.

    Returns a `Dataset` with columns `prompt` (chat messages asking the question) and `answer` (the reference answer
    as a string, with GSM8K's `#### answer` reduced to the answer). Raises `DatasetFormatError` naming the file when
    it is missing, unreadable, of an unknown extension, empty, or without `question_column` or `answer_column`.
    """
    path = Path(path)
    if not path.is_file():
        raise DatasetFormatError(f"{path}: dataset file not found (or not a regular file)")
    try:
        data = _read_records(path)
    except DatasetFormatError:
        raise
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise DatasetFormatError(f"{path}: cannot read dataset file: {err}") from err
    except Exception as err:  # pyarrow raises its own types for corrupt Parquet
        raise DatasetFormatError(f"{path}: cannot read dataset file: {type(err).__name__}: {err}") from err

    if isinstance(data, Dataset):
        columns, num_rows = set(data.column_names), data.num_rows
    else:
        num_rows = len(data)
        # A JSONL row may lack a key that others have: require it in every row.
        columns = set.intersection(*(set(record) for record in data)) if data else set()
    if num_rows == 0:
        raise DatasetFormatError(f"{path}: dataset file has no rows")
    for role, column in (("question", question_column), ("answer", answer_column)):
        if column not in columns:
            available = ", ".join(sorted(columns)) or "none"
            raise DatasetFormatError(
                f"{path}: missing {role} column {column!r} (in every row); available columns: {available}. "
                f"Choose the column with the {role}_column option."
            )

    questions: Sequence[Any] = (
        data[question_column] if isinstance(data, Dataset) else [r[question_column] for r in data]
    )
    answers: Sequence[Any] = data[answer_column] if isinstance(data, Dataset) else [r[answer_column] for r in data]
    for row, (question, answer) in enumerate(zip(questions, answers), start=1):
        if question is None or answer is None or not str(question).strip() or not str(answer).strip():
            raise DatasetFormatError(f"{path}: row {row} has an empty question or answer")
        # str() of a dict or list would make a prompt or an answer nobody wrote; rows count from 1.
        if not isinstance(question, str):
            raise DatasetFormatError(f"{path}: row {row} has a question of type {type(question).__name__}, not text")
        if isinstance(answer, bool) or not isinstance(answer, (str, numbers.Real)):
            raise DatasetFormatError(
                f"{path}: row {row} has an answer of type {type(answer).__name__}; answers must be text or a number"
            )
    final_answers = []
    for row, answer in enumerate(answers, start=1):
        try:
            final_answers.append(extract_gsm8k_answer(answer))
        except ValueError as err:
            raise DatasetFormatError(f"{path}: row {row}: the answer {err}") from None
    return Dataset.from_dict(
        {"prompt": [make_prompt(str(q), system_prompt) for q in questions], "answer": final_answers}
    )
