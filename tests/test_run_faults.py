"""Training runs survive faults (issue 15, items 1-4, 6, 7 and Ctrl-C): a real `sarkern train` subprocess on the
bundled tiny model is killed or interrupted at a named moment (tests/fault_injection.py), then restarted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("trl")

from sarkern import cli  # noqa: E402
from sarkern.cli import parse_options, run_train  # noqa: E402

QUICK = ["--max-completion-length", "16", "--prompts-per-step", "2", "--num-generations", "2", "--num-problems", "16"]
FAULTS = Path(__file__).with_name("fault_injection.py")


def train_argv(out: Path, steps: int = 4, save_steps: int = 2, *extra: str) -> list[str]:
    return ["train", "--steps", str(steps), "--save-steps", str(save_steps), "--output-dir", str(out), *QUICK, *extra]


def sarkern_train(argv: list[str], fault: str | None = None, step: int = 0, **popen) -> subprocess.CompletedProcess:
    """`sarkern train` in a fresh process, optionally with a fault injected at `step`."""
    cmd = [sys.executable, str(FAULTS), fault, str(step), *argv] if fault else [sys.executable, "-m", "sarkern.cli"]
    if not fault:
        cmd += argv
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, **popen)


def steps_in(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


# ------------------------------------------------------------------------------------- 1: kill during a checkpoint


def test_sigkill_while_writing_a_checkpoint_resumes_from_the_previous_one(tmp_path, capsys):
    out = tmp_path / "run"
    killed = sarkern_train(train_argv(out), fault="kill-in-checkpoint", step=4)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert (out / "checkpoint-2").is_dir() and not (out / "checkpoint-4").exists()  # only complete ones get a name

    assert cli.main(train_argv(out)) == 0  # the restart, in this process to keep the test short
    assert f"resuming from {out / 'checkpoint-2'}" in capsys.readouterr().out
    assert steps_in(out) == [1, 2, 3, 4]
    assert (out / "checkpoint-4" / "trainer_state.json").is_file() and (out / "final").is_dir()


def test_ctrl_c_while_writing_a_checkpoint_says_where_to_resume(tmp_path, capsys):
    out = tmp_path / "run"
    stopped = sarkern_train(train_argv(out), fault="interrupt-in-checkpoint", step=4)
    assert stopped.returncode == 130
    assert "Traceback" not in stopped.stderr
    assert (
        f"sarkern train: interrupted at step 4; run the same command again to resume from {out / 'checkpoint-2'}"
    ) in stderr_lines(stopped)
    run_train(parse_options(train_argv(out)))
    assert f"resuming from {out / 'checkpoint-2'}" in capsys.readouterr().out
    assert steps_in(out) == [1, 2, 3, 4]


def stderr_lines(done: subprocess.CompletedProcess) -> list[str]:
    """The lines of stderr, without the progress bars that share it (they redraw with carriage returns)."""
    return [line.split("\r")[-1].strip() for line in done.stderr.splitlines()]


# ----------------------------------------------------------------------------- 2: --no-resume never resumes the old


def test_no_resume_then_crash_never_resumes_the_old_run(tmp_path, capsys):
    out = tmp_path / "run"
    run_train(parse_options(train_argv(out)))  # an old, finished run with checkpoints 2 and 4
    old_model = (out / "final" / "model.safetensors").read_bytes()

    new_run = train_argv(out, 4, 2, "--learning-rate", "3e-4")
    killed = sarkern_train([*new_run, "--no-resume"], fault="kill-after-step", step=3)
    assert killed.returncode == -9, killed.stderr[-2000:]

    capsys.readouterr()
    run_train(parse_options(new_run))  # a plain restart of the new run
    assert f"resuming from {out / 'checkpoint-2'}" in capsys.readouterr().out
    assert steps_in(out) == [1, 2, 3, 4]
    assert (out / "final" / "model.safetensors").read_bytes() != old_model


# ----------------------------------------------------------------------------------- 3: two runs, one directory


def test_a_second_run_on_a_busy_directory_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    first = subprocess.Popen(
        [sys.executable, str(FAULTS), "hold-after-step", "1", *train_argv(out, 2, 2)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 300  # a bound on a hang, not a timing assumption
        while not (out / ".hold-reached").exists():
            assert first.poll() is None, first.communicate()[1][-2000:]
            assert time.monotonic() < deadline, "the first run never reached step 1"
            time.sleep(0.05)
        with pytest.raises(SystemExit, match=f"{out} is in use by another sarkern train \\(pid {first.pid}\\)"):
            run_train(parse_options(train_argv(out, 2, 2)))
    finally:
        (out / ".hold-release").touch()
        _, stderr = first.communicate(timeout=600)
    assert first.returncode == 0, stderr[-2000:]
    assert steps_in(out) == [1, 2]


# ------------------------------------------------------------------------------------------- 4: a finished run


def test_a_finished_run_says_so_and_trains_no_further(tmp_path, capsys):
    out = tmp_path / "run"
    argv = train_argv(out, 2, 1)
    assert cli.main(argv) == 0
    state = (out / "checkpoint-2" / "trainer_state.json").read_text()
    metrics = (out / "metrics.jsonl").read_text()
    capsys.readouterr()

    assert cli.main(argv) == 0
    assert "already finished its 2 steps" in capsys.readouterr().out
    assert not (out / "checkpoint-3").exists() and (out / "checkpoint-1").is_dir()
    assert (out / "checkpoint-2" / "trainer_state.json").read_text() == state
    assert (out / "metrics.jsonl").read_text() == metrics

    # Stopped after its last checkpoint but before it recorded the end: it finishes without another step.
    record = json.loads((out / "sarkern-run.json").read_text())
    (out / "sarkern-run.json").write_text(json.dumps({**record, "status": "running"}))
    final = (out / "final" / "model.safetensors").read_bytes()
    (out / "final" / "model.safetensors").unlink()
    assert cli.main(argv) == 0
    assert not (out / "checkpoint-3").exists()
    assert (out / "final" / "model.safetensors").read_bytes() == final
    assert json.loads((out / "sarkern-run.json").read_text())["status"] == "finished"
    assert steps_in(out) == [1, 2]


# -------------------------------------------------------------------------------------- 6: the user's README.md


def test_files_of_others_in_the_output_directory_are_never_overwritten(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "README.md").write_text("my notes\n")
    run_train(parse_options(train_argv(out, 1, 1)))
    assert (out / "README.md").read_text() == "my notes\n"
    assert (out / "final" / "README.md").is_file()  # the model card goes with the model

    other = tmp_path / "other"
    (other / "checkpoint-5").mkdir(parents=True)  # someone else's folder named like a checkpoint
    with pytest.raises(SystemExit, match="checkpoint-5, which no sarkern run there wrote"):
        run_train(parse_options(train_argv(other, 1, 1)))
    assert (other / "checkpoint-5").is_dir()


# ------------------------------------------------------------------------------------- 7: a torn metrics line


def test_a_metrics_line_torn_by_a_crash_is_repaired_on_resume(tmp_path):
    out = tmp_path / "run"
    killed = sarkern_train(train_argv(out), fault="torn-metrics", step=3)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert not (out / "metrics.jsonl").read_text().endswith("\n")

    with pytest.warns(RuntimeWarning, match="metrics.jsonl: line 3 is not a complete JSON record"):
        run_train(parse_options(train_argv(out)))
    assert steps_in(out) == [1, 2, 3, 4]


# -------------------------------------------------------------------------------------------- 16: Ctrl-C, exit code


def test_ctrl_c_during_a_step_stops_with_one_line(tmp_path):
    out = tmp_path / "run"
    stopped = sarkern_train(train_argv(out, 4, 2), fault="interrupt-after-step", step=3)
    assert stopped.returncode == 130 and "Traceback" not in stopped.stderr
    assert (
        f"sarkern train: interrupted at step 3; run the same command again to resume from {out / 'checkpoint-2'}"
    ) in stderr_lines(stopped)
    assert os.path.isdir(out / "checkpoint-2")
