"""`sarkern train` checks what it is given before step 1 and says what is wrong in one line (issue 15, items 5 and
13-16)."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("trl")

from sarkern import cli  # noqa: E402
from sarkern.cli import build_trainer, load_model_and_tokenizer, parse_options  # noqa: E402
from sarkern.tasks import DatasetFormatError, load_qa_file  # noqa: E402
from sarkern.tiny import TINY_MODEL_DIR  # noqa: E402

QUICK = ["--max-completion-length", "16", "--prompts-per-step", "2", "--num-generations", "2", "--num-problems", "16"]


def error_of(argv: list[str], capsys) -> str:
    """What `sarkern train ARGV` prints on stderr when it refuses to run (status 2), as one line."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("sarkern train: error: "), err
    return err


def last_error_of(argv: list[str], capsys) -> str:
    """The error line of a refusal that comes after the model loaded (its progress bar shares stderr)."""
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1].split("\r")[-1]
    assert err.startswith("sarkern train: error: "), err
    return err


def write_yaml(tmp_path: Path, text: str | bytes) -> str:
    path = tmp_path / "run.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return str(path)


# ---------------------------------------------------------------------------------------- 14: typed, ranged options


@pytest.mark.parametrize(
    "yaml_text, message",
    [
        ('bf16: "false"', "option 'bf16' must be true or false, got str 'false'"),
        ('resume: "no"', "option 'resume' must be true or false, got str 'no'"),
        ("steps: 2.5", "option 'steps' must be an integer, got float 2.5"),
        ("sar_weight: [1]", "option 'sar_weight' must be a number, got list"),
        ("model: 3", "option 'model' must be a string, got int 3"),
    ],
)
def test_yaml_values_of_the_wrong_type_name_the_key(tmp_path, capsys, yaml_text, message):
    assert message in error_of(["train", "--config", write_yaml(tmp_path, yaml_text)], capsys)


def test_yaml_1_1_exponent_numbers_are_numbers(tmp_path):
    """PyYAML reads `1e-4` as a string; it is a learning rate, not a TypeError after training starts."""
    options = parse_options(["train", "--config", write_yaml(tmp_path, "learning_rate: 1e-4\nbf16: false\n")])
    assert options.learning_rate == 1e-4 and options.bf16 is False


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--steps", "-3"], "option 'steps' must be >= 1, got -3"),
        (["--steps", "0"], "option 'steps' must be >= 1, got 0"),
        (["--num-problems", "30000000"], "option 'num_problems' must be in [1, 100000], got 30000000"),
        (["--num-problems", "0"], "option 'num_problems' must be in [1, 100000], got 0"),
        (["--num-generations", "1"], "option 'num_generations' must be >= 2, got 1"),
        (["--seed", "-1"], "option 'seed' must be in [0, 4294967295], got -1"),
        (["--sar-weight", "nan"], "option 'sar_weight' must be a finite number, got nan"),
        (["--temperature", "0"], "temperature must be a positive finite number, got 0.0"),
        (["--temperature", "-1"], "temperature must be a positive finite number, got -1.0"),
        (["--temperature", "1e-40"], "temperature 1e-40 is outside"),
        (["--learning-rate", "inf"], "option 'learning_rate' must be a finite number"),
    ],
)
def test_option_ranges_are_checked_before_anything_runs(tmp_path, capsys, flags, message):
    err = error_of(["train", "--output-dir", str(tmp_path / "out"), "--steps", "1", *QUICK, *flags], capsys)
    assert message in err
    assert not (tmp_path / "out").exists()  # refused before touching the output directory


def test_num_generations_one_in_yaml(tmp_path, capsys):
    err = error_of(["train", "--config", write_yaml(tmp_path, "num_generations: 1\n")], capsys)
    assert "option 'num_generations' must be >= 2, got 1" in err


# --------------------------------------------------------------------------------------------- 16: one-line errors


def test_unreadable_configs_are_one_line_errors(tmp_path, capsys):
    assert "is not valid YAML" in error_of(["train", "--config", write_yaml(tmp_path, "steps: [1, 2\n")], capsys)
    assert "is not UTF-8 text" in error_of(["train", "--config", write_yaml(tmp_path, b"steps: \xff\xfe\n")], capsys)


def test_output_directory_that_is_a_file_or_under_one(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert "exists and is not a directory" in error_of(["train", "--output-dir", str(blocker), *QUICK], capsys)
    assert "cannot write to output directory" in error_of(
        ["train", "--output-dir", str(blocker / "run"), *QUICK], capsys
    )


def test_output_directory_that_cannot_be_written(capsys):
    # /proc refuses new entries even to root, for whom a read-only mode would not do.
    assert "cannot write to output directory /proc/sarkern-run" in error_of(
        ["train", "--output-dir", "/proc/sarkern-run", *QUICK], capsys
    )


def test_unknown_backend_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("SARKERN_BACKEND", "cuda-magic")
    assert "SARKERN_BACKEND='cuda-magic'" in error_of(["train", "--output-dir", str(tmp_path / "o"), *QUICK], capsys)


def test_an_unknown_placeholder_preset_in_a_config_file_is_named(tmp_path, capsys):
    config = write_yaml(tmp_path, "placeholder: empty\n")
    assert "placeholder must be one of ('template', 'paper'), got 'empty'" in error_of(
        ["train", "--config", config], capsys
    )


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(SystemExit, match="option 'steps' must be >= 1"):
        cli.main(["train", "--steps", "0", "--debug"])


def test_the_installed_command_prints_one_line_and_exits_non_zero(tmp_path):
    done = subprocess.run(
        [sys.executable, "-m", "sarkern.cli", "train", "--config", write_yaml(tmp_path, 'bf16: "false"\n')],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"sarkern train: error: {tmp_path / 'run.yaml'}: option 'bf16' must be true or false, got str 'false'"
    ]


def test_scorer_accepts_numpy_temperatures_and_names_a_bad_cond_logprobs():
    import torch

    from sarkern import SARScorer

    model, tokenizer = load_model_and_tokenizer(None)
    scorer = SARScorer(model, tokenizer, temperature=np.float32(0.7))
    assert scorer.temperature == pytest.approx(0.7)
    with pytest.raises(ValueError, match="temperature .* float32"):
        SARScorer(model, tokenizer, temperature=1e-40)
    with pytest.raises(TypeError, match="cond_logprobs must be a 2-D tensor or a list of 1-D tensors, got str"):
        scorer.score([[5, 6, 7]], [[8, 9]], cond_logprobs="abc")
    assert torch.isfinite(scorer.score([[5, 6, 7]], [[8, 9]]).reward).all()


# --------------------------------------------------------------------------------- 5: prompts too long for the model


def _qa_file(tmp_path: Path, rows: list[dict]) -> str:
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_a_prompt_longer_than_the_model_positions_is_refused_with_its_row(tmp_path, capsys):
    rows = [{"question": f"{i} + 1 = ?", "answer": str(i + 1)} for i in range(4)]
    rows[2]["question"] = "1 + " * 200 + "1 = ?"  # 804 characters; the tiny model has 512 positions
    argv = ["train", "--dataset", _qa_file(tmp_path, rows), "--output-dir", str(tmp_path / "out"), *QUICK]
    with pytest.raises(SystemExit, match=r"row 3 has a prompt of \d+ tokens, more than the \d+ that the model's 512"):
        build_trainer(parse_options(argv))

    trainer = build_trainer(parse_options([*argv, "--drop-long-prompts"]))
    assert "left out 1 of 4 prompts too long for the model" in capsys.readouterr().out
    assert len(trainer.train_dataset) == 3


def test_the_placeholder_prompt_must_leave_room_for_the_completions_too(tmp_path, capsys):
    """Issue 21, item 5: SAR scores every completion after its placeholder prompt, which can be longer than the
    prompts (the paper's fixed system prompt is 141 tokens on the bundled model, whose prompts are shorter): it is
    checked with them before step 1, for every preset, not found after two steps."""
    from sarkern.placeholder import PLACEHOLDER_PRESETS, PlaceholderPrompts

    _, tokenizer = load_model_and_tokenizer(None)
    for preset in PLACEHOLDER_PRESETS:
        length = len(PlaceholderPrompts(tokenizer, preset=preset).default)
        fits = 512 - length  # the longest completion the placeholder leaves room for
        argv = ["train", "--placeholder", preset, "--output-dir", str(tmp_path / preset), *QUICK]
        err = last_error_of([*argv, "--max-completion-length", str(fits + 1)], capsys)
        assert (
            f"SAR's placeholder prompt (--placeholder {preset}) is {length} tokens, more than the {length - 1} that "
            f"the model's 512 positions leave beside max_completion_length {fits + 1}: lower --max-completion-length "
            "by at least 1"
        ) in err
        assert not (tmp_path / preset / "metrics.jsonl").exists()
    # The command: the paper's placeholder with --max-completion-length 386.
    assert "(--placeholder paper) is 141 tokens" in last_error_of(
        ["train", "--placeholder", "paper", "--max-completion-length", "386", "--output-dir", str(tmp_path)], capsys
    )


# ------------------------------------------------------------------------------------- 15: unverifiable answers


@pytest.mark.parametrize(
    "answer, message",
    [
        ("five", "row 2 has the answer 'five', which math-verify cannot parse"),
        ("", "row 2 has an empty question or answer"),
        ({"a": 1}, "row 2 has an answer of type dict; answers must be text or a number"),
        ([1, 2], "row 2 has an answer of type list"),
        ("7\n8", "row 2 has the answer '7\\\\n8', which no completion could match"),
    ],
)
def test_answers_that_can_never_be_verified_are_refused(tmp_path, answer, message):
    rows = [{"question": "1 + 1 = ?", "answer": "2"}, {"question": "2 + 2 = ?", "answer": answer}]
    argv = ["train", "--dataset", _qa_file(tmp_path, rows), "--output-dir", str(tmp_path / "out"), *QUICK]
    with pytest.raises(SystemExit, match=message):
        build_trainer(parse_options(argv))


def test_text_answers_are_accepted_when_asked_for(tmp_path):
    rows = [{"question": "1 + 1 = ?", "answer": "two"}, {"question": "2 + 2 = ?", "answer": "four"}]
    path = _qa_file(tmp_path, rows)
    trainer = build_trainer(parse_options(["train", "--dataset", path, "--text-answers", *QUICK]))
    assert trainer.train_dataset["answer"] == ["two", "four"]
    with pytest.raises(DatasetFormatError, match="row 1 has a question of type int"):
        load_qa_file(_qa_file(tmp_path, [{"question": 5, "answer": "1"}]))
    assert math.isclose(float(load_qa_file(_qa_file(tmp_path, [{"question": "q", "answer": 2.5}]))["answer"][0]), 2.5)


# ------------------------------------------------------------------------------------------ 13: remote code


def _model_with_custom_code(tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the tiny model whose config maps to Python code in the directory; running it leaves a marker."""
    model_dir, marker = tmp_path / "model", tmp_path / "EXECUTED"
    shutil.copytree(TINY_MODEL_DIR, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    config["model_type"] = "sarkern-remote-code-test"
    config["auto_map"] = {"AutoConfig": "custom.CustomConfig", "AutoModelForCausalLM": "custom.CustomModel"}
    (model_dir / "config.json").write_text(json.dumps(config))
    (model_dir / "custom.py").write_text(
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import Qwen2Config, Qwen2ForCausalLM\n"
        "class CustomConfig(Qwen2Config):\n"
        "    model_type = 'sarkern-remote-code-test'\n"
        "class CustomModel(Qwen2ForCausalLM):\n"
        "    config_class = CustomConfig\n"
    )
    return model_dir, marker


def test_code_in_a_model_directory_never_runs_without_the_flag(tmp_path):
    model_dir, marker = _model_with_custom_code(tmp_path)
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf")}
    done = subprocess.run(
        [sys.executable, "-m", "sarkern.cli", "train", "--model", str(model_dir), "--output-dir", str(tmp_path / "o")],
        input="y\n",  # what a user might answer to transformers' y/N question: there must be no question
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 2 and not marker.exists()
    assert "[y/N]" not in done.stdout + done.stderr
    assert "contains custom Python code, which sarkern does not run unless you pass --trust-remote-code" in done.stderr

    script = (
        "import sys; from sarkern.cli import load_model_and_tokenizer\n"
        "model, _ = load_model_and_tokenizer(sys.argv[1], trust_remote_code=True)\n"
        "print(type(model).__name__)\n"
    )
    trusted = subprocess.run(
        [sys.executable, "-c", script, str(model_dir)], capture_output=True, text=True, timeout=300, env=env
    )
    assert trusted.returncode == 0, trusted.stderr[-2000:]
    assert marker.read_text() == "ran" and trusted.stdout.strip() == "CustomModel"
