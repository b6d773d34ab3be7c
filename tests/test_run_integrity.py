"""Runs that cannot be hijacked, mixed or stranded (issue 21, items 1-3): a `sarkern train` run stopped after its
checkpoints (under ZeRO-3: two real processes killed mid-save, tests/fault_injection.py) has its directory tampered
with or damaged, and the same command is run again."""

from __future__ import annotations

import io
import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("trl")

from sarkern import cli  # noqa: E402
from sarkern.checkpoint_integrity import TAG_FILE, file_digests, verify_checkpoint  # noqa: E402
from sarkern.rundir import RunDirectory  # noqa: E402
from sarkern.tiny import TINY_MODEL_DIR  # noqa: E402

QUICK = ["--max-completion-length", "16", "--prompts-per-step", "2", "--num-generations", "2", "--num-problems", "16"]
FAULTS = Path(__file__).with_name("fault_injection.py")
CONFIGS = Path(__file__).parents[1] / "examples" / "accelerate"


def train_argv(out: Path, *extra: str) -> list[str]:
    return ["train", "--steps", "2", "--save-steps", "1", "--output-dir", str(out), *QUICK, *extra]


def steps_in(out: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


class RunsCode:
    """A pickle that runs a shell command when it is loaded with full pickle: it creates `marker`."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def plant(path: Path, marker: Path, *, as_torch_archive: bool = True) -> None:
    import torch

    path.unlink(missing_ok=True)
    if as_torch_archive:
        torch.save(RunsCode(marker), path)
    else:
        path.write_bytes(pickle.dumps(RunsCode(marker)))


def rewrite_manifest(checkpoint: Path) -> None:
    """What someone who knows sarkern would do after planting a file: digest the checkpoint afresh."""
    tag = json.loads((checkpoint / TAG_FILE).read_text())
    (checkpoint / TAG_FILE).write_text(json.dumps({**tag, "files": file_digests(checkpoint)}))


@pytest.fixture(scope="module")
def stopped_run(tmp_path_factory) -> Path:
    """A 2-step run stopped after its last checkpoint, before it recorded its end (as a kill there leaves it):
    checkpoint-1 and checkpoint-2 on disk, status "running". Copy it before changing anything."""
    out = tmp_path_factory.mktemp("stopped") / "run"
    assert cli.main(train_argv(out)) == 0
    record = json.loads((out / "sarkern-run.json").read_text())
    (out / "sarkern-run.json").write_text(json.dumps({**record, "status": "running"}))
    assert (out / "checkpoint-1").is_dir() and (out / "checkpoint-2").is_dir()
    return out


def recorded_options(out: Path) -> dict:
    return json.loads((out / "sarkern-run.json").read_text())["options"]


def copy_of(run: Path, tmp_path: Path) -> Path:
    out = tmp_path / "run"
    shutil.copytree(run, out, ignore=shutil.ignore_patterns(".sarkern.lock"))
    return out


# --------------------------------------------------------------------------- 3: a damaged newest checkpoint


def test_a_truncated_newest_checkpoint_is_named_and_the_previous_one_resumed(stopped_run, tmp_path, capsys):
    out = copy_of(stopped_run, tmp_path)
    weights = out / "checkpoint-2" / "model.safetensors"
    size = weights.stat().st_size
    with weights.open("r+b") as handle:
        handle.truncate(size // 2)

    capsys.readouterr()
    # The same command again, with a setting a resume may change (how often it saves).
    assert cli.main(train_argv(out, "--save-steps", "2")) == 0
    stdout = capsys.readouterr().out
    assert (
        f"sarkern train: checkpoint-2 is damaged: {weights} is {size // 2} bytes, but the run wrote {size} "
        f"(truncated?); falling back to {out / 'checkpoint-1'}"
    ) in stdout
    assert f"resuming from {out / 'checkpoint-1'}" in stdout
    assert steps_in(out) == [1, 2]
    verify_checkpoint(out / "checkpoint-2", step=2, max_step=2)  # the damaged one, replaced by an intact one
    assert (out / "final" / "model.safetensors").is_file()


def _damage(kind: str, checkpoint: Path, marker: Path) -> str:
    """Damage `checkpoint` in the way named; returns the file a resume must name."""
    state = checkpoint / "trainer_state.json"
    if kind == "truncated optimizer":
        optimizer = checkpoint / "optimizer.pt"
        optimizer.write_bytes(optimizer.read_bytes()[:100])
        return f"{optimizer} is 100 bytes"
    if kind in ("planted pickle", "planted pickle, manifest rewritten"):
        plant(checkpoint / "optimizer.pt", marker)
        if kind.endswith("rewritten"):
            rewrite_manifest(checkpoint)
            return f"{checkpoint / 'optimizer.pt'} does not load as weights only"
        planted = checkpoint / "optimizer.pt"
        return f"{planted} is {planted.stat().st_size} bytes, but the run wrote"
    if kind == "bare pickle, manifest rewritten":
        plant(checkpoint / "rng_state.pth", marker, as_torch_archive=False)
        rewrite_manifest(checkpoint)
        return f"{checkpoint / 'rng_state.pth'} is not a torch.save archive"
    if kind == "same size, other bytes":
        weights = checkpoint / "model.safetensors"
        data = bytearray(weights.read_bytes())
        data[-1] ^= 1
        weights.write_bytes(bytes(data))
        return f"{weights} differs from the file the run wrote (its sha256 does not match)"
    if kind == "file added":
        plant(checkpoint / "extra.pt", marker)
        return f"{checkpoint / 'extra.pt'} is not one of the files the run wrote"
    if kind == "malformed trainer state, manifest rewritten":
        state.write_text(state.read_text()[:-40])
        rewrite_manifest(checkpoint)
        return f"{state} is not a readable trainer state"
    if kind == "step beyond the plan, manifest rewritten":
        state.write_text(json.dumps({**json.loads(state.read_text()), "global_step": 1_000_000_000}))
        rewrite_manifest(checkpoint)
        return f"{state} records global_step 1000000000, not this checkpoint's step 2"
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    [
        "truncated optimizer",
        "planted pickle",
        "same size, other bytes",
        "planted pickle, manifest rewritten",
        "bare pickle, manifest rewritten",
        "file added",
        "malformed trainer state, manifest rewritten",
        "step beyond the plan, manifest rewritten",
    ],
)
def test_every_kind_of_damage_is_named_and_passed_over_without_loading_it(stopped_run, tmp_path, kind):
    """What a restart resumes from (`RunDirectory.prepare`, as `sarkern train` calls it): never a damaged
    checkpoint, whatever the damage, and nothing in it runs: the digests catch a changed file, and the content
    checks catch one whose digests were rewritten to match."""
    out = copy_of(stopped_run, tmp_path)
    marker = tmp_path / "code-ran"
    named = _damage(kind, out / "checkpoint-2", marker)
    with RunDirectory.open(out) as run:
        resume_from = run.prepare(resume=True, steps=2, options=recorded_options(out))
    assert resume_from == out / "checkpoint-1"
    assert len(run.passed_over) == 1 and run.passed_over[0].startswith("checkpoint-2 is damaged: ")
    assert named in run.passed_over[0]
    assert not marker.exists()


def test_a_checkpoint_beyond_the_plan_is_never_taken_as_finished(stopped_run, tmp_path):
    """A step count from beyond the run's plan (here a folder of step 8 in a 2-step run) is not a finished run."""
    out = copy_of(stopped_run, tmp_path)
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-8")
    state = out / "checkpoint-8" / "trainer_state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "global_step": 8}))
    rewrite_manifest(out / "checkpoint-8")
    with RunDirectory.open(out) as run:
        assert run.prepare(resume=True, steps=2, options=recorded_options(out)) == out / "checkpoint-2"
    assert run.passed_over == [f"checkpoint-8 is damaged: {state} is at step 8, beyond the run's 2 steps"]


# --------------------------------------------------------------------------- 2: a resume that changes the run


def test_a_resume_with_any_defining_option_changed_is_refused_by_name(stopped_run, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(TINY_MODEL_DIR, model)
    dataset = tmp_path / "qa.jsonl"
    dataset.write_text("".join(json.dumps({"question": f"{i} + 1?", "answer": str(i + 1)}) + "\n" for i in range(8)))
    before = {name: (stopped_run / name).read_bytes() for name in ("metrics.jsonl", "sarkern-run.json")}
    changes = {
        "--reward": ("none", "'sar'"),
        "--sar-weight": ("0.3", "0.2"),
        "--seed": ("1", "0"),
        "--learning-rate": ("3e-4", "0.0001"),
        "--dataset": (str(dataset), "None"),
        "--model": (str(model), "None"),
        "--prompts-per-step": ("1", "2"),
        "--placeholder": ("paper", "'template'"),
    }
    for option, (value, recorded) in changes.items():
        assert cli.main([*train_argv(stopped_run), option, value]) == 2, option
        err = capsys.readouterr().err.strip()
        assert err.startswith(
            f"sarkern train: error: cannot resume the run in {stopped_run} with changed options that define it: "
            f"{option} (recorded {recorded}, now "
        ), err
        assert "pass --no-resume to start a new run there" in err and "may change only --save-steps" in err
    assert {name: (stopped_run / name).read_bytes() for name in before} == before  # nothing ran, nothing mixed


def test_a_run_record_without_options_is_not_resumed_blindly(stopped_run, tmp_path, capsys):
    out = copy_of(stopped_run, tmp_path)
    record = json.loads((out / "sarkern-run.json").read_text())
    del record["options"]
    (out / "sarkern-run.json").write_text(json.dumps(record))
    assert cli.main(train_argv(out)) == 2
    assert "records no options (an older sarkern wrote it)" in capsys.readouterr().err


def test_every_option_either_defines_the_run_or_may_change_on_resume():
    """A new option is recorded as defining the run unless it is listed as one a resume may change."""
    options = cli.parse_options(["train", "--dataset", "qa.jsonl"])
    defining = cli.run_defining_options(options)
    assert set(defining) | set(cli.MAY_CHANGE_ON_RESUME) == {f for f in vars(options)}
    assert defining["dataset"] == str(Path("qa.jsonl").resolve()) and "save_steps" not in defining


# --------------------------------------------------------------------------- 1: no code runs on resume, any engine


def test_a_planted_pickle_never_runs_on_a_zero3_resume(tmp_path, free_port):
    """DeepSpeed loads `global_step*/*.pt` with full pickle. Two CPU processes under the shipped ZeRO-3 config are
    killed while they write checkpoint-3; every `.pt` of checkpoint-2 is replaced by a pickle that runs a shell
    command, and its digests rewritten to match. The same command again must not run it: it names the file and
    resumes (under ZeRO-3, through DeepSpeed's loader) from the intact checkpoint-1."""
    pytest.importorskip("deepspeed", reason="DeepSpeed is not installed (pip install deepspeed)")
    out, marker = tmp_path / "run", tmp_path / "code-ran"
    launch = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "zero3.yaml"),
        "--num_processes", "2", "--mixed_precision", "no", "--main_process_port", str(free_port),
    ]  # fmt: skip
    argv = ["train", "--steps", "3", "--save-steps", "1", "--output-dir", str(out), *QUICK]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    killed = subprocess.run(
        [*launch, str(FAULTS), "kill-in-checkpoint", "3", *argv], capture_output=True, text=True, timeout=600, env=env
    )
    assert killed.returncode != 0 and (out / "checkpoint-2" / "global_step2").is_dir(), killed.stderr[-3000:]
    assert (out / "checkpoint-1").is_dir() and not (out / "checkpoint-3").exists()
    planted = sorted((out / "checkpoint-2" / "global_step2").glob("*.pt"))
    assert len(planted) == 4  # model and optimizer states of each process
    for path in planted:
        plant(path, marker)
    rewrite_manifest(out / "checkpoint-2")

    again = subprocess.run([*launch, "-m", "sarkern.cli", *argv], capture_output=True, text=True, timeout=600, env=env)
    assert not marker.exists(), "the planted pickle ran"
    assert again.returncode == 0, again.stderr[-3000:]
    assert (f"sarkern train: checkpoint-2 is damaged: {planted[0]} does not load as weights only") in again.stdout
    assert f"falling back to {out / 'checkpoint-1'}" in again.stdout
    assert f"resuming from {out / 'checkpoint-1'}; 2 process(es) on cpu:0 (DeepSpeed ZeRO-3)" in again.stdout
    assert steps_in(out) == [1, 2, 3]


def test_a_distributed_checkpoint_is_checked_without_unpickling_it(tmp_path):
    """FSDP2's sharded checkpoints (torch's distributed checkpoint) `pickle.load` their index and load non-tensor
    items with full pickle: both are checked with restricted unpicklers, and what torch wrote passes."""
    import torch
    import torch.distributed.checkpoint as dcp

    from sarkern.checkpoint_integrity import DamagedCheckpoint, check_distributed_checkpoint

    marker = tmp_path / "code-ran"
    written = tmp_path / "pytorch_model_fsdp_0"
    dcp.save({"model": {"w": torch.randn(3, 4)}, "step": 3, "lr": [1e-3]}, checkpoint_id=str(written))
    check_distributed_checkpoint(written / ".metadata")

    planted = tmp_path / "planted"
    shutil.copytree(written, planted)
    (planted / ".metadata").write_bytes(pickle.dumps(RunsCode(marker)))
    with pytest.raises(DamagedCheckpoint, match="not a plain distributed-checkpoint index .*posix.system"):
        check_distributed_checkpoint(planted / ".metadata")

    # A non-tensor item replaced by a pickle of the same length that runs code.
    item = tmp_path / "item"
    shutil.copytree(written, item)
    shard = next(item.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    evil = io.BytesIO()
    torch.save(RunsCode(marker), evil)
    index = pickle.loads((item / ".metadata").read_bytes())
    key = next(k for k in index.storage_data if k.fqn == "step")
    info = index.storage_data[key]
    data[info.offset : info.offset + info.length] = evil.getvalue()
    shard.write_bytes(bytes(data))
    info.length = len(evil.getvalue())
    (item / ".metadata").write_bytes(pickle.dumps(index))
    with pytest.raises(DamagedCheckpoint, match="item 'step' does not load as weights only"):
        check_distributed_checkpoint(item / ".metadata")
    assert not marker.exists()


def test_a_damaged_checkpoint_beyond_the_resumed_step_never_pushes_an_intact_one_out(stopped_run, tmp_path):
    """Rotation (save_total_limit) keeps the newest checkpoints up to the step just saved: a damaged newer one a
    resume passed over does not count, so the intact ones stay."""
    from sarkern.rundir import rotate_checkpoints

    out = copy_of(stopped_run, tmp_path)
    run_id = json.loads((out / "sarkern-run.json").read_text())["run_id"]
    shutil.copytree(out / "checkpoint-2", out / "checkpoint-8")
    rotate_checkpoints(out, run_id, keep=1, step=2)
    assert (out / "checkpoint-2").is_dir() and (out / "checkpoint-8").is_dir() and not (out / "checkpoint-1").exists()
