"""The output directory of a training run: its identity and lock, atomic checkpoints, and what a restart resumes.

A run killed at any moment (SIGKILL, Ctrl-C, a crash) leaves a directory that the next `sarkern train` can resume
from, and two runs can never mix their files. What sarkern keeps there, and nothing else is ever overwritten:

    sarkern-run.json     the run's identity (a random id), status ("running", or "finished" after its last step),
                         the options that define it, and the checkpoint this start resumes from
    .sarkern.lock        locked (flock) by the process training into the directory; the OS drops it when it dies
    .sarkern-staging/    checkpoints being written; each is renamed to checkpoint-N only when complete
    checkpoint-N/        complete checkpoints, tagged with the id of the run that wrote it and the size and sha256 of
                         every file in it (sarkern-checkpoint.json)
    final/  metrics.jsonl  metrics.png

A restart resumes from the newest intact checkpoint of the run named in `sarkern-run.json` (every file as the run
wrote it, nothing that can run code on load: `checkpoint_integrity`), saying which newer ones it passed over and why,
and only with the options the run was started with (`changed_options`); `--no-resume` gives
the directory a new identity first and then removes the old run's files, so a crash at any point in between never
resumes the old run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint_integrity import DamagedCheckpoint, file_digests, verify_checkpoint

RUN_FILE = "sarkern-run.json"
LOCK_FILE = ".sarkern.lock"
STAGING_DIR = ".sarkern-staging"
CHECKPOINT_TAG = "sarkern-checkpoint.json"
# What a run writes besides its checkpoints; removed when a new run takes the directory over.
RUN_OUTPUTS = ("final", "metrics.jsonl", "metrics.png")
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


class RunDirError(ValueError):
    """The output directory cannot be used as asked; the message says why and what to do."""


# --------------------------------------------------------------------------------------------------- small tools


def write_json_atomic(path: Path, data: dict) -> None:
    """Write `data` to a temporary file and rename it over `path`: a reader sees the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as handle:
        json.dump(data, handle, indent=1)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def checkpoint_step(path: Path) -> int | None:
    match = _CHECKPOINT.match(path.name)
    return int(match.group(1)) if match else None


def checkpoint_run_id(path: Path) -> str | None:
    """The id of the run that wrote this complete checkpoint, or None for a folder sarkern did not finish."""
    try:
        tag = json.loads((path / CHECKPOINT_TAG).read_text())
    except (OSError, ValueError):
        return None
    return tag.get("run_id") if isinstance(tag, dict) else None


def sarkern_checkpoints(output_dir: Path) -> dict[Path, str | None]:
    """Every `checkpoint-N` folder sarkern completed in `output_dir`, with the id of the run that wrote it."""
    found = {}
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            if checkpoint_step(path) is not None and path.is_dir() and (path / CHECKPOINT_TAG).is_file():
                found[path] = checkpoint_run_id(path)
    return found


def newest_checkpoint(output_dir: Path, run_id: str | None) -> Path | None:
    """The newest complete checkpoint of run `run_id`, whatever a kill left behind beside it."""
    mine = [p for p, owner in sarkern_checkpoints(output_dir).items() if owner == run_id]
    mine = [p for p in mine if (p / "trainer_state.json").is_file()]
    return max(mine, key=checkpoint_step) if mine else None


def newest_intact_checkpoint(output_dir: Path, run_id: str | None, max_step: int) -> tuple[Path | None, list[str]]:
    """The newest checkpoint of run `run_id` that passes `verify_checkpoint`, and why each newer one did not."""
    mine = [p for p, owner in sarkern_checkpoints(output_dir).items() if owner == run_id]
    passed_over = []
    for path in sorted(mine, key=checkpoint_step, reverse=True):
        try:
            verify_checkpoint(path, step=checkpoint_step(path), max_step=max_step)
        except DamagedCheckpoint as damage:
            passed_over.append(f"{path.name} is damaged: {damage}")
            continue
        return path, passed_over
    return None, passed_over


def changed_options(output_dir: Path, record: dict, options: dict) -> dict[str, tuple]:
    """The options that define the run whose values differ from those recorded: {name: (recorded, now)}."""
    recorded = record.get("options")
    if not isinstance(recorded, dict):
        raise RunDirError(
            f"{Path(output_dir) / RUN_FILE} records no options (an older sarkern wrote it), so a resume cannot "
            "tell whether it would change the run: pass --no-resume to start a new run there, or use another "
            "--output-dir"
        )
    return {k: (recorded.get(k), v) for k, v in options.items() if k not in recorded or recorded[k] != v}


def check_writable(output_dir: Path) -> None:
    """Create `output_dir` if needed and prove it writable now, not after the first training step."""
    if output_dir.exists() and not output_dir.is_dir():
        raise RunDirError(f"output directory {output_dir} exists and is not a directory")
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe = output_dir / f".sarkern-write-test.{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as err:
        raise RunDirError(f"cannot write to output directory {output_dir}: {err.strerror or err}") from err


def read_run_record(output_dir: Path) -> dict | None:
    """The run record (`sarkern-run.json`) of `output_dir`, or None when it has none."""
    path = Path(output_dir) / RUN_FILE
    if not path.exists():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise RunDirError(
            f"{path} is unreadable ({err}); it is sarkern's record of the run in this directory: "
            "restore it, or use another --output-dir"
        ) from err
    if not isinstance(record, dict) or not isinstance(record.get("run_id"), str):
        raise RunDirError(f"{path} does not hold a sarkern run record; use another --output-dir")
    return record


# ------------------------------------------------------------------------------------------ atomic checkpoints


def publish_checkpoint(staged: Path, final: Path, run_id: str | None) -> None:
    """Tag the fully written `staged` checkpoint with its run and the digest of every file in it, then rename it to
    `final` in one step."""
    tag = {"run_id": run_id, "step": checkpoint_step(final), "files": file_digests(staged)}
    write_json_atomic(staged / CHECKPOINT_TAG, tag)
    if final.exists():  # a checkpoint of the same step from an earlier attempt: replace it
        stale = staged.parent / f"{final.name}.replaced"
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
        os.replace(staged, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(staged, final)
    _fsync_dir(final.parent)


def rotate_checkpoints(output_dir: Path, run_id: str | None, keep: int | None, step: int | None = None) -> None:
    """Keep the newest `keep` complete checkpoints of this run up to `step` (all of them when `keep` is None).

    Checkpoints beyond `step` are damaged ones a resume passed over: they must not take the places of intact ones."""
    if not keep or keep < 1:
        return
    mine = sorted(
        (
            p
            for p, owner in sarkern_checkpoints(output_dir).items()
            if owner == run_id and (step is None or checkpoint_step(p) <= step)
        ),
        key=checkpoint_step,
    )
    for path in mine[:-keep]:
        shutil.rmtree(path, ignore_errors=True)


class AtomicCheckpoints:
    """Trainer mixin: each checkpoint is written under `.sarkern-staging/` and renamed to `checkpoint-N` when
    complete, so a kill mid-save never leaves a half-written `checkpoint-N` for a resume to choke on.

    TRL writes a model card to `<output_dir>/README.md` at every save, over any README the user keeps there; here it
    goes into the checkpoint instead (or into `sarkern_model_card_dir` when that is set).
    """

    sarkern_run_id: str | None = None
    sarkern_model_card_dir: str | None = None
    _sarkern_staging: Path | None = None

    def _get_output_dir(self, trial):
        if self._sarkern_staging is not None:
            return str(self._sarkern_staging)
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial):
        run_dir = Path(super()._get_output_dir(trial))
        name = f"checkpoint-{self.state.global_step}"
        staging = run_dir / STAGING_DIR
        if self.args.should_save:
            shutil.rmtree(staging / name, ignore_errors=True)  # a leftover of an earlier, killed attempt
            (staging / name).mkdir(parents=True)
        self.accelerator.wait_for_everyone()
        self._sarkern_staging = staging
        try:
            super()._save_checkpoint(model, trial)  # every process writes its part into the staged folder
        finally:
            self._sarkern_staging = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            publish_checkpoint(staging / name, run_dir / name, self.sarkern_run_id)
            try:
                staging.rmdir()  # only when nothing else is staged there
            except OSError:
                pass
            rotate_checkpoints(run_dir, self.sarkern_run_id, self.args.save_total_limit, self.state.global_step)
        self.accelerator.wait_for_everyone()

    def create_model_card(self, *args, **kwargs):
        if self._sarkern_staging is not None:
            target = self._sarkern_staging / f"checkpoint-{self.state.global_step}"
        elif self.sarkern_model_card_dir is not None:
            target = Path(self.sarkern_model_card_dir)
        else:
            return
        original = self.args.output_dir
        self.args.output_dir = str(target)
        try:
            super().create_model_card(*args, **kwargs)
        finally:
            self.args.output_dir = original


# ------------------------------------------------------------------------------------------- run identity and lock


class RunLock:
    """An exclusive `flock` on `<output_dir>/.sarkern.lock`, held while a run trains there. The OS releases it when
    the process dies, however it dies, so there is never a stale lock to clean up."""

    def __init__(self, output_dir: Path):
        self.path = output_dir / LOCK_FILE
        self._handle = None

    def acquire(self) -> None:
        import fcntl

        handle = self.path.open("a+")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise RunDirError(
                f"output directory {self.path.parent} is in use by another sarkern train (pid {holder}); "
                "wait for it to finish or choose another --output-dir"
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._handle = handle

    def release(self) -> None:
        if self._handle is not None:
            self._handle.close()  # closing drops the flock
            self._handle = None


@dataclass
class RunDirectory:
    """One run's view of its output directory; `open` it, then `prepare` it once the run's inputs are checked."""

    path: Path
    main_process: bool = True
    barrier: Callable[[], None] = lambda: None
    run_id: str | None = None
    status: str | None = None
    finished_steps: int | None = None
    passed_over: list[str] = field(default_factory=list)
    _lock: RunLock | None = None

    @classmethod
    def open(cls, path: str | Path, *, main_process: bool = True, barrier: Callable[[], None] | None = None):
        """Check the directory is writable and lock it (on the main process); changes nothing else yet."""
        run = cls(Path(path), main_process, barrier or (lambda: None))
        if main_process:
            check_writable(run.path)
            run._lock = RunLock(run.path)
            run._lock.acquire()
        return run

    def close(self) -> None:
        if self._lock is not None:
            self._lock.release()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --------------------------------------------------------------------------------------------------------

    def read_identity(self) -> dict | None:
        return read_run_record(self.path)

    def prepare(self, *, resume: bool, steps: int, options: dict) -> Path | None:
        """Settle which run this is and return the checkpoint to resume from (None: start at step 0).

        Resuming keeps the recorded run; a directory without one, or `resume=False`, gets a new run whose identity
        and defining `options` are written before the previous run's files are removed. The main process chooses
        the newest intact checkpoint and records it, so that every process resumes from the same one;
        `self.passed_over` says (there) which newer checkpoints were damaged. On return `self.status` says whether
        the run has already finished."""
        if self.main_process:
            self._prepare_main(resume=resume, steps=steps, options=options)
        self.barrier()
        record = self.read_identity() or {}
        self.run_id, self.status = record.get("run_id"), record.get("status")
        self.finished_steps = record.get("steps")
        resume_from = record.get("resume_from")
        return self.path / resume_from if resume_from and self.status != "finished" else None

    def _prepare_main(self, *, resume: bool, steps: int, options: dict) -> None:
        shutil.rmtree(self.path / STAGING_DIR, ignore_errors=True)  # checkpoints a kill left half-written
        for leftover in self.path.glob(f".{RUN_FILE}.*.tmp"):
            leftover.unlink(missing_ok=True)
        record = self.read_identity()
        # Folders named like checkpoints that no sarkern run completed, and, without a run record, outputs sarkern
        # would write: someone else's files, which sarkern neither resumes from nor overwrites.
        foreign = sorted(
            p.name
            for p in self.path.iterdir()
            if (checkpoint_step(p) is not None and p.is_dir() and not (p / CHECKPOINT_TAG).is_file())
            or (record is None and p.name in RUN_OUTPUTS)
        )
        if foreign:
            raise RunDirError(
                f"output directory {self.path} holds {', '.join(foreign)}, which no sarkern run there wrote; "
                "sarkern will not resume from or overwrite them: move them away or choose another --output-dir"
            )
        if record is None or not resume:
            record = {"run_id": uuid.uuid4().hex, "status": "running", "steps": steps, "started": time.time()}
            record["options"] = options
            write_json_atomic(self.path / RUN_FILE, record)
            for name in RUN_OUTPUTS:  # the previous run's outputs (sarkern's: the directory had its record)
                target = self.path / name
                if target.is_dir():
                    shutil.rmtree(target)
                else:
                    target.unlink(missing_ok=True)
        # Checkpoints of any other run (one replaced by --no-resume, perhaps killed halfway through the cleanup).
        for path, owner in sarkern_checkpoints(self.path).items():
            if owner != record["run_id"]:
                shutil.rmtree(path, ignore_errors=True)
        checkpoint, self.passed_over = newest_intact_checkpoint(self.path, record["run_id"], steps)
        if record.get("resume_from") != (checkpoint and checkpoint.name):
            write_json_atomic(self.path / RUN_FILE, {**record, "resume_from": checkpoint and checkpoint.name})

    def mark_finished(self, steps: int) -> None:
        if self.main_process:
            record = self.read_identity() or {"run_id": self.run_id}
            record.update(status="finished", steps=steps, finished=time.time())
            write_json_atomic(self.path / RUN_FILE, record)
        self.status, self.finished_steps = "finished", steps
