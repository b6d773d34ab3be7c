"""The synthetic arithmetic task and the loader of local question/answer files."""

from __future__ import annotations

import json
import re
import string

import pytest
from datasets import Dataset

from sarkern.tasks import (
    ANSWER_MARKER,
    MAX_VALUE,
    DatasetFormatError,
    Verbosity,
    extract_gsm8k_answer,
    generate_problems,
    load_qa_file,
    make_prompt,
    problem_split,
    synthetic_arithmetic_dataset,
)

ALPHABET = set(string.ascii_lowercase + string.digits + " .,:?+-*=")
EQUATION = re.compile(r"^(\d+)([+\-*])(\d+)=(\d+)$")


def _evaluate(equation: str) -> tuple[int, int]:
    left, op, right, result = EQUATION.match(equation).groups()
    value = {"+": int(left) + int(right), "-": int(left) - int(right), "*": int(left) * int(right)}[op]
    return value, int(result)


# ----------------------------------------------------------------------------------------------------------------------
# Synthetic task
# ----------------------------------------------------------------------------------------------------------------------


def test_same_seed_same_problems_and_different_seed_different_problems():
    first = synthetic_arithmetic_dataset(50, seed=3)
    again = synthetic_arithmetic_dataset(50, seed=3)
    other = synthetic_arithmetic_dataset(50, seed=4)
    assert first.to_list() == again.to_list()
    assert first["prompt"] != other["prompt"]


def test_dataset_columns_are_trl_conversational():
    dataset = synthetic_arithmetic_dataset(8, seed=0)
    assert dataset.column_names == ["prompt", "answer"]
    for row in dataset:
        assert [m["role"] for m in row["prompt"]] == ["user"]
        assert row["prompt"][0]["content"].endswith("?")
        assert re.fullmatch(r"\d+", row["answer"])


def test_system_prompt_goes_first():
    dataset = synthetic_arithmetic_dataset(2, seed=0, system_prompt="be brief.")
    assert dataset[0]["prompt"][0] == {"role": "system", "content": "be brief."}
    assert dataset[0]["prompt"][1]["role"] == "user"
    assert make_prompt("q?") == [{"role": "user", "content": "q?"}]


@pytest.mark.parametrize("split", ["train", "test"])
def test_solutions_are_arithmetically_consistent(split):
    for problem in generate_problems(300, seed=11, split=split):
        assert 2 <= len(problem.equations) <= 3
        for equation in problem.equations:
            value, written = _evaluate(equation)
            assert value == written, equation
            assert 0 <= written <= MAX_VALUE
        # The chain ends at the answer, and every number of the question is used by some equation.
        assert _evaluate(problem.equations[-1])[1] == problem.answer
        operands = {n for eq in problem.equations for n in re.findall(r"\d+", eq.split("=")[0])}
        assert set(re.findall(r"\d+", problem.question)) <= operands


def test_every_verbosity_ends_with_the_answer_and_lengths_grow():
    problems = generate_problems(200, seed=5)
    for problem in problems:
        texts = [problem.solution(v) for v in Verbosity]
        for text in texts:
            assert text.endswith(f"{ANSWER_MARKER} {problem.answer}")
        assert len(texts[0]) < len(texts[1]) < len(texts[2])
    # Completions stay short enough for fast CPU generation.
    assert max(len(p.solution(Verbosity.PADDED)) for p in problems) <= 170
    assert max(len(p.question) for p in problems) <= 120


def test_alphabet_is_small():
    for problem in generate_problems(300, seed=1):
        text = problem.question + "".join(problem.solution(v) for v in Verbosity)
        assert set(text) <= ALPHABET, set(text) - ALPHABET


def test_splits_are_disjoint_whatever_the_seeds():
    train = {p.question for p in generate_problems(2000, seed=0, split="train")}
    test = {p.question for p in generate_problems(300, seed=0, split="test")}
    assert not train & test
    assert all(problem_split(q) == "train" for q in train)
    assert all(problem_split(q) == "test" for q in test)


def test_problems_within_a_draw_are_distinct():
    questions = [p.question for p in generate_problems(1000, seed=2)]
    assert len(set(questions)) == len(questions)


def test_step_bounds_are_respected():
    assert all(len(p.equations) == 2 for p in generate_problems(100, seed=0, min_steps=2, max_steps=2))
    assert all(len(p.equations) == 3 for p in generate_problems(100, seed=0, min_steps=3, max_steps=3))
    with pytest.raises(ValueError):
        generate_problems(1, min_steps=3, max_steps=2)
    with pytest.raises(ValueError):
        generate_problems(1, split="validation")


# ----------------------------------------------------------------------------------------------------------------------
# GSM8K answers and the file loader
# ----------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7", "7"),
        ("Total is 1,234,567 dollars.\n#### 1,234,567", "1234567"),
        ("#### -12", "-12"),
        ("so x = 2.5\n####   2.5  ", "2.5"),
        ("42", "42"),
        ("  \\frac{1}{2} ", "\\frac{1}{2}"),
    ],
)
def test_extract_gsm8k_answer(text, expected):
    assert extract_gsm8k_answer(text) == expected


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_load_jsonl_gsm8k_format(tmp_path):
    path = _write_jsonl(
        tmp_path / "gsm8k.jsonl",
        [
            {"question": "Ann has 2 cats and buys 1,000 more. How many?", "answer": "2+1000=1002\n#### 1,002"},
            {"question": "What is 3 times 4?", "answer": "3*4=12\n#### 12"},
        ],
    )
    dataset = load_qa_file(path)
    assert dataset.column_names == ["prompt", "answer"]
    assert dataset["answer"] == ["1002", "12"]
    assert dataset[0]["prompt"] == [{"role": "user", "content": "Ann has 2 cats and buys 1,000 more. How many?"}]


def test_load_parquet_with_custom_columns(tmp_path):
    path = tmp_path / "qa.parquet"
    # Numeric answers (a non-string column) come back as strings.
    Dataset.from_dict({"problem": ["1+1?", "2+3?"], "solution": [2, 5]}).to_parquet(str(path))
    dataset = load_qa_file(path, question_column="problem", answer_column="solution", system_prompt="sys")
    assert dataset["answer"] == ["2", "5"]
    assert dataset[1]["prompt"] == [{"role": "system", "content": "sys"}, {"role": "user", "content": "2+3?"}]


def test_load_json_array(tmp_path):
    path = tmp_path / "qa.json"
    path.write_text(json.dumps([{"question": "q?", "answer": "#### 3"}]), encoding="utf-8")
    assert load_qa_file(path)["answer"] == ["3"]


@pytest.mark.parametrize("missing", ["question", "answer"])
def test_missing_column_names_file_and_column(tmp_path, missing):
    row = {"question": "q?", "answer": "1"}
    del row[missing]
    path = _write_jsonl(tmp_path / "bad.jsonl", [row])
    with pytest.raises(DatasetFormatError) as info:
        load_qa_file(path)
    message = str(info.value)
    assert str(path) in message
    assert repr(missing) in message


def test_missing_custom_column_in_parquet(tmp_path):
    path = tmp_path / "qa.parquet"
    Dataset.from_dict({"question": ["q?"], "answer": ["1"]}).to_parquet(str(path))
    with pytest.raises(DatasetFormatError, match=r"missing answer column 'solution'") as info:
        load_qa_file(path, answer_column="solution")
    assert str(path) in str(info.value)


def test_column_missing_in_some_jsonl_rows(tmp_path):
    path = _write_jsonl(tmp_path / "ragged.jsonl", [{"question": "a?", "answer": "1"}, {"question": "b?"}])
    with pytest.raises(DatasetFormatError, match="'answer'"):
        load_qa_file(path)


def test_unknown_extension(tmp_path):
    path = tmp_path / "qa.csv"
    path.write_text("question,answer\nq?,1\n", encoding="utf-8")
    with pytest.raises(DatasetFormatError, match=r"unknown dataset file extension '\.csv'") as info:
        load_qa_file(path)
    assert str(path) in str(info.value)


def test_unreadable_files(tmp_path):
    with pytest.raises(DatasetFormatError, match="not found"):
        load_qa_file(tmp_path / "absent.jsonl")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": "q?", "answer": "1"}\n{not json\n', encoding="utf-8")
    with pytest.raises(DatasetFormatError, match="line 2") as info:
        load_qa_file(broken)
    assert str(broken) in str(info.value)
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"this is not parquet")
    with pytest.raises(DatasetFormatError, match="cannot read") as info:
        load_qa_file(corrupt)
    assert str(corrupt) in str(info.value)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n", encoding="utf-8")
    with pytest.raises(DatasetFormatError, match="no rows"):
        load_qa_file(empty)
    binary = tmp_path / "binary.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(DatasetFormatError, match="cannot read"):
        load_qa_file(binary)


# ---------------------------------------------------------------- issue 21 item 12: final answers and file encodings


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        # A bare marker means the final answer is missing; the last number of the working (48) is not it.
        ("She sells 48 clips in April and half as many in May.\n####", "ends in '####' with no final answer"),
        ("16 - 3 - 4 = 9\n####   \n", "ends in '####' with no final answer"),
        # Two final answers: which one the author meant is a guess (GSM8K has exactly one).
        ("#### 5 #### 6", "has 2 '####' final-answer markers"),
        ("2 + 3 = 5\n#### 5\n#### 6", "has 2 '####' final-answer markers"),
    ],
)
def test_gsm8k_answers_without_one_final_answer_are_refused_with_their_row(tmp_path, answer, message):
    with pytest.raises(ValueError, match=message):
        extract_gsm8k_answer(answer)
    rows = [{"question": "a?", "answer": "#### 1"}, {"question": "b?", "answer": answer}]
    path = _write_jsonl(tmp_path / "qa.jsonl", rows)
    with pytest.raises(DatasetFormatError, match=f"row 2: the answer {message}") as info:
        load_qa_file(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_duplicated_json_key_is_refused_naming_it(tmp_path, suffix):
    # json.loads would keep "8" silently: the reference answer would be whichever key came last.
    row = '{"question": "2+2?", "answer": "4", "answer": "8"}'
    path = tmp_path / f"qa{suffix}"
    text = f"[{row}]" if suffix == ".json" else '{"question": "1+1?", "answer": "2"}\n' + row + "\n"
    path.write_text(text, encoding="utf-8")
    where = "the JSON array" if suffix == ".json" else "line 2"
    with pytest.raises(DatasetFormatError, match=f"{where} has the key 'answer' twice") as info:
        load_qa_file(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("suffix", [".jsonl", ".json"])
def test_a_utf8_byte_order_mark_is_accepted(tmp_path, suffix):
    rows = [{"question": "Wie viel ist 2+2?", "answer": "#### 4"}, {"question": "3+3?", "answer": "6"}]
    text = json.dumps(rows) if suffix == ".json" else "".join(json.dumps(r) + "\n" for r in rows)
    path = tmp_path / f"qa{suffix}"
    path.write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))  # what Windows editors write
    dataset = load_qa_file(path)
    assert dataset["answer"] == ["4", "6"]
    assert dataset[0]["prompt"] == [{"role": "user", "content": "Wie viel ist 2+2?"}]
