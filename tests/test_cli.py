"""`sarkern train`: options, bad input stopped before training, resume, and two processes under accelerate."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

from transformers import TrainerCallback  # noqa: E402

from sarkern.cli import build_trainer, parse_options, run_train  # noqa: E402
from sarkern.tiny import TINY_MODEL_DIR  # noqa: E402

QUICK = ["--max-completion-length", "24", "--prompts-per-step", "2", "--num-generations", "4", "--num-problems", "32"]


def test_defaults_yaml_and_flags(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("steps: 7\nsar_weight: 0.5\nreward: o1_pruner\nlearning-rate: 0.001\n")
    options = parse_options(["train", "--config", str(config), "--steps", "3"])
    assert options.steps == 3  # the flag wins over the file
    assert options.sar_weight == 0.5 and options.reward == "o1_pruner" and options.learning_rate == 0.001
    assert parse_options(["train"]).model is None  # the bundled model
    assert parse_options(["train", "--no-resume"]).resume is False


def test_unknown_yaml_option_is_refused(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("stepz: 7\n")
    with pytest.raises(SystemExit, match="unknown options .*stepz"):
        parse_options(["train", "--config", str(config)])


def test_dataset_without_answer_column_stops_before_training(tmp_path):
    data = tmp_path / "qa.jsonl"
    data.write_text(json.dumps({"question": "1 + 1?", "solution": "2"}) + "\n")
    options = parse_options(["train", "--dataset", str(data), "--output-dir", str(tmp_path / "out")])
    with pytest.raises(SystemExit, match=r"qa\.jsonl.*answer"):
        build_trainer(options)


def test_unreadable_model_directory(tmp_path):
    with pytest.raises(SystemExit, match="does not exist"):
        build_trainer(parse_options(["train", "--model", str(tmp_path / "nope")]))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{ not json")
    with pytest.raises(SystemExit, match="cannot read a model config"):
        build_trainer(parse_options(["train", "--model", str(broken)]))


def test_model_directory_without_tokenizer(tmp_path):
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    for name in ("config.json", "generation_config.json", "model.safetensors"):
        if (Path(TINY_MODEL_DIR) / name).exists():
            shutil.copy(Path(TINY_MODEL_DIR) / name, model_dir / name)
    with pytest.raises(SystemExit, match="no usable tokenizer"):
        build_trainer(parse_options(["train", "--model", str(model_dir)]))


class _CrashAfterLogging(TrainerCallback):
    """Simulates a run killed right after it logged `step` (and after the checkpoint before it)."""

    def __init__(self, step: int):
        self.step = step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.global_step == self.step and logs and "reward" in logs:
            raise KeyboardInterrupt(f"stopped at step {self.step}")


def _steps(metrics: Path) -> list[int]:
    return [json.loads(line)["step"] for line in metrics.read_text().splitlines()]


def test_resume_continues_from_the_last_checkpoint(tmp_path):
    out = tmp_path / "run"
    argv = ["train", "--steps", "4", "--save-steps", "2", "--output-dir", str(out), *QUICK]
    with pytest.raises(KeyboardInterrupt):
        run_train(parse_options(argv), extra_callbacks=[_CrashAfterLogging(3)])
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists()
    assert _steps(out / "metrics.jsonl") == [1, 2, 3]
    before = (out / "metrics.jsonl").read_text().splitlines()[:2]

    run_train(parse_options(argv))
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert _steps(out / "metrics.jsonl") == [1, 2, 3, 4]  # step 3 redone once, nothing lost or duplicated
    assert lines[:2] == before
    assert (out / "checkpoint-4").is_dir() and (out / "metrics.png").is_file() and (out / "final").is_dir()


def test_two_processes_under_accelerate(tmp_path, free_port):
    """Two processes (DDP over gloo) on the CPU, with the shipped DDP config (examples/accelerate/ddp.yaml).
    accelerate's `--cpu` flag runs a single process (its multi-CPU launcher needs MPI), so the processes come from its
    torchrun launcher, which the config's MULTI_GPU selects and which falls back to CPU and gloo without CUDA."""
    out = tmp_path / "run"
    config = Path(__file__).parents[1] / "examples" / "accelerate" / "ddp.yaml"
    cmd = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config), "--num_processes", "2",
        "--mixed_precision", "no", "--main_process_port", str(free_port),
        "-m", "sarkern.cli", "train", "--steps", "2", "--output-dir", str(out), *QUICK,
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "2 process(es) on cpu" in done.stdout and "(DDP)" in done.stdout  # the engine asked for
    # Which way SAR is scored, and why: one line, from the main process only.
    assert done.stdout.count("SAR scoring path: packed (") == 1, done.stdout[-3000:]
    assert _steps(out / "metrics.jsonl") == [1, 2]
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert "rewards/sar/mean" in record and "sar/ppl_uncond" in record
