"""The study's files. Processes sharing one work directory never rewrite each other's data: a data file is
created once (atomically, by a hard link that fails if it exists) and verified by everyone after; the manifest
(`study.json`) is read, checked and rewritten under the study's lock; reports are replaced atomically."""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

LOCK_FILE = ".study.lock"


def file_digest(path: str | Path) -> str:
    """sha256 of a file's bytes, hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _temporary(path: Path) -> Path:
    # Each process (and thread) writes its own temporary.
    return path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")


def replace_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(temporary)`, then rename the temporary onto `path`: a killed study never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary(path)
    try:
        write(temporary)
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


def write_atomic(path: Path, data: bytes) -> None:
    replace_atomically(path, lambda temporary: temporary.write_bytes(data))


def json_bytes(data: Any) -> bytes:
    return (json.dumps(data, indent=2) + "\n").encode()


def write_json(path: Path, data: Any) -> None:
    write_atomic(path, json_bytes(data))


def create_once(path: Path, data: bytes) -> tuple[bytes, bool]:
    """Create `path` holding `data` unless it exists; never rewrite it. Returns (what `path` holds now, whether this
    call created it). The file appears whole or not at all: written aside, then hard-linked into place, which
    fails when another process got there first (then its file is what counts, for the caller to verify)."""
    if path.exists():
        return path.read_bytes(), False
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = _temporary(path)
    try:
        temporary.write_bytes(data)
        try:
            os.link(temporary, path)
        except FileExistsError:
            return path.read_bytes(), False
    finally:
        temporary.unlink(missing_ok=True)
    return data, True


@contextlib.contextmanager
def study_lock(workdir: Path) -> Iterator[None]:
    """Exclusive lock of the study's manifest among processes sharing `workdir` (held for milliseconds: a read,
    a check and a write of study.json)."""
    workdir.mkdir(parents=True, exist_ok=True)
    with open(workdir / LOCK_FILE, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
