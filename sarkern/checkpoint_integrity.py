"""What a resume may load from a checkpoint: exactly the files the run wrote, and nothing that can run code.

Engines load parts of a checkpoint with full pickle: DeepSpeed's checkpoint engine calls
`torch.load(weights_only=False)` on `global_step*/*.pt`, torch's distributed checkpoint `pickle.load`s its
`.metadata`. So a file planted in an output directory (shared storage, in a multi-node run) would run code on every
process that resumes. Two checks stand in front of every load, neither of which patches an engine:

* a digest manifest: when a checkpoint is published, the size and sha256 of every file in it are written into its
  tag file; before a resume, every file must be there, unchanged, and no other file may have appeared;
* the content itself, for whoever rewrote the manifest too: every file an engine unpickles must load with
  `torch.load(weights_only=True)` (torch's restricted unpickler, with the few plain data classes DeepSpeed and
  transformers store allowed by name), the distributed-checkpoint index with an unpickler restricted to its own
  metadata classes (and the non-tensor items its shards hold, which it loads with full pickle, weights only), and
  `trainer_state.json` must hold this checkpoint's step, within the run's plan.

A checkpoint that fails either check is reported as damaged, naming the file and the cause (`DamagedCheckpoint`).
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import zipfile
from pathlib import Path

TAG_FILE = "sarkern-checkpoint.json"
# What the engines unpickle when they resume: torch.save files (DeepSpeed's `global_step*/*.pt` with full pickle;
# transformers' optimizer, scheduler, RNG states weights-only) and torch's distributed-checkpoint index (FSDP2).
# Every other file is parsed as what it is (JSON, safetensors, tokenizer and text files) and covered by its digest.
_TORCH_SAVE_SUFFIXES = (".pt", ".pth", ".bin", ".pkl", ".pickle", ".ckpt")
_DISTRIBUTED_CHECKPOINT_INDEX = ".metadata"
# Written for users and never loaded on resume (transformers' pickled TrainingArguments): the digest covers it.
_NOT_LOADED = ("training_args.bin",)
_CHUNK = 1 << 20


class DamagedCheckpoint(Exception):
    """A checkpoint that must not be resumed from; `str()` names the file and the cause."""


def file_digests(folder: Path) -> dict[str, dict]:
    """The size and sha256 of every file under `folder` (its tag file excepted), by path relative to it."""
    digests = {}
    for path in sorted(folder.rglob("*")):
        if path.is_symlink():
            raise DamagedCheckpoint(f"{path} is a symbolic link; a checkpoint holds only its own files")
        if path.is_file() and path.relative_to(folder).as_posix() != TAG_FILE:
            digests[path.relative_to(folder).as_posix()] = {"size": path.stat().st_size, "sha256": _sha256(path)}
    return digests


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def verify_checkpoint(folder: Path, *, step: int, max_step: int) -> None:
    """Raise `DamagedCheckpoint` unless `folder` (checkpoint-`step`) holds exactly the files its run wrote, none of
    which can run code on load, and a trainer state at `step`, no further than the run's `max_step`."""
    try:
        tag = json.loads((folder / TAG_FILE).read_text())
    except (OSError, ValueError) as err:
        raise DamagedCheckpoint(f"{folder / TAG_FILE} is unreadable ({err})") from None
    written = tag.get("files") if isinstance(tag, dict) else None
    if not isinstance(written, dict):
        raise DamagedCheckpoint(f"{folder / TAG_FILE} holds no digests of the checkpoint's files")
    present = {}
    for path in sorted(folder.rglob("*")):
        name = path.relative_to(folder).as_posix()
        if path.is_symlink():
            raise DamagedCheckpoint(f"{path} is a symbolic link; a checkpoint holds only its own files")
        if path.is_file() and name != TAG_FILE:
            present[name] = path
    for name in sorted(set(present) - set(written)):
        raise DamagedCheckpoint(f"{present[name]} is not one of the files the run wrote into the checkpoint")
    for name, expected in sorted(written.items()):
        path = folder / name
        if name not in present:
            raise DamagedCheckpoint(f"{path} is missing")
        size = path.stat().st_size
        if not isinstance(expected, dict) or size != expected.get("size"):
            raise DamagedCheckpoint(f"{path} is {size} bytes, but the run wrote {expected.get('size')} (truncated?)")
        if _sha256(path) != expected.get("sha256"):
            raise DamagedCheckpoint(f"{path} differs from the file the run wrote (its sha256 does not match)")
    _check_trainer_state(folder / "trainer_state.json", step=step, max_step=max_step)
    for path in present.values():
        if path.name.endswith(_DISTRIBUTED_CHECKPOINT_INDEX):
            check_distributed_checkpoint(path)
        elif _under_deepspeed(path, folder):
            check_loads_without_code(path, _deepspeed_data_classes())
        elif path.suffix in _TORCH_SAVE_SUFFIXES and path.name not in _NOT_LOADED:
            check_loads_without_code(path)


def _under_deepspeed(path: Path, folder: Path) -> bool:
    """Whether the file is in a DeepSpeed checkpoint folder, where DeepSpeed may `torch.load` any file."""
    return any(part.startswith("global_step") for part in path.relative_to(folder).parts[:-1])


def _check_trainer_state(path: Path, *, step: int, max_step: int) -> None:
    try:
        state = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise DamagedCheckpoint(f"{path} is not a readable trainer state ({' '.join(str(err).split())})") from None
    global_step = state.get("global_step") if isinstance(state, dict) else None
    if not isinstance(global_step, int) or isinstance(global_step, bool) or global_step != step:
        raise DamagedCheckpoint(f"{path} records global_step {global_step!r}, not this checkpoint's step {step}")
    if step > max_step:
        raise DamagedCheckpoint(f"{path} is at step {step}, beyond the run's {max_step} steps")


def _deepspeed_data_classes() -> list:
    """Plain data classes DeepSpeed puts in its checkpoints, which unpickle without running code."""
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def check_loads_without_code(path: Path, allowed_classes: list = ()) -> None:
    """Refuse a file that torch's restricted unpickler will not load (with `allowed_classes` besides what
    transformers allows): whatever loads it later (with full pickle, as DeepSpeed does) then meets only tensors,
    containers and those classes."""
    import torch

    try:  # what transformers allows, too (transformers 5; 4.x defines it in transformers.trainer)
        from transformers.trainer_pt_utils import safe_globals as numpy_rng_classes
    except ImportError:
        from transformers.trainer import safe_globals as numpy_rng_classes

    if not zipfile.is_zipfile(path):  # torch.save's format; a bare pickle is what a planted file would be
        raise DamagedCheckpoint(f"{path} is not a torch.save archive; it is refused unread")
    try:
        with numpy_rng_classes(), torch.serialization.safe_globals(list(allowed_classes)):
            torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as err:  # noqa: BLE001 - any refusal or damage means: do not load this file
        reason = " ".join(str(err).split()[:40])
        raise DamagedCheckpoint(f"{path} does not load as weights only ({type(err).__name__}: {reason})") from None


# What torch's distributed-checkpoint index (`.metadata`, a plain pickle) is made of: the data classes defined in
# these modules (never a function, nor anything they import), dtypes, memory formats and the few names below.
_INDEX_MODULES = (
    "torch.distributed.checkpoint.metadata",
    "torch.distributed.checkpoint.planner",
    "torch.distributed.checkpoint.filesystem",
)
_INDEX_GLOBALS = {
    ("collections", "OrderedDict"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # a layout by its name
    ("pathlib", "PosixPath"),  # where the checkpoint was written
    ("pathlib", "WindowsPath"),
}


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module, name):
        import torch

        if (module, name) in _INDEX_GLOBALS:
            return super().find_class(module, name)
        if module in _INDEX_MODULES or module == "torch":
            found = super().find_class(module, name)
            if module != "torch" and isinstance(found, type) and found.__module__ == module:
                return found
            if module == "torch" and isinstance(found, (torch.dtype, torch.memory_format)):
                return found
        raise pickle.UnpicklingError(f"{module}.{name} is not part of a distributed-checkpoint index")


def check_distributed_checkpoint(index: Path) -> None:
    """Refuse a distributed checkpoint whose index (`.metadata`) references anything but its own metadata classes,
    or whose non-tensor items (stored with torch.save inside the shards, loaded back with full pickle) do not load
    as weights only."""
    import torch
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    try:
        with index.open("rb") as handle:
            metadata = _IndexUnpickler(handle).load()
        items = [(key, info) for key, info in (metadata.storage_data or {}).items()]
        kinds = metadata.state_dict_metadata
    except Exception as err:  # noqa: BLE001 - any refusal or damage means: do not load this checkpoint
        reason = " ".join(str(err).split()[:40])
        raise DamagedCheckpoint(f"{index} is not a plain distributed-checkpoint index ({reason})") from None
    for key, info in items:
        if not isinstance(kinds.get(key.fqn), BytesStorageMetadata):
            continue  # a tensor: torch's reader loads it weights only
        shard = index.parent / info.relative_path
        if info.transform_descriptors:
            raise DamagedCheckpoint(f"{shard}: item {key.fqn!r} is stored transformed and cannot be checked")
        try:
            with shard.open("rb") as handle:
                handle.seek(info.offset)
                data = io.BytesIO(handle.read(info.length))
            torch.load(data, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001
            reason = " ".join(str(err).split()[:40])
            raise DamagedCheckpoint(
                f"{shard}: item {key.fqn!r} does not load as weights only ({type(err).__name__}: {reason})"
            ) from None
