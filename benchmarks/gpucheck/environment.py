"""Section 1: the device and versions (torch, Triton, driver, sarkern's commit and source digest, the peers)."""

from __future__ import annotations

import hashlib
import importlib.metadata
import inspect
import json
import os
import platform
import shutil
import subprocess
from pathlib import Path

import torch

from . import ROOT
from .install import peer_requirements, report_peer_requirements
from .report import Run
from .settings import MiB
from .variants import primary_sarkern

# Read from the installed metadata (importlib.metadata), nothing imported: the peers and what they need at import
# time, which the image may or may not have (TRL imports datasets, which needs pyarrow and fsspec).
PEERS = (
    "numpy",
    "transformers",
    "accelerate",
    "tokenizers",
    "safetensors",
    "huggingface-hub",
    "trl",
    "datasets",
    "pyarrow",
    "fsspec",
    "pandas",
    "xxhash",
    "dill",
    "multiprocess",
    "liger-kernel",
    "cut-cross-entropy",
    "flash-attn",
    "pytest",
    "packaging",
)


def _command(*args: str) -> str | None:
    if shutil.which(args[0]) is None:
        return None
    try:
        done = subprocess.run(args, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def source_digest() -> str:
    """sha256 over sarkern's and the kernels' sources: names the code measured where the copy has no .git."""
    h = hashlib.sha256()
    for path in sorted([*ROOT.glob("sarkern/**/*.py"), *ROOT.glob("kernels/**/*.py")]):
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes() + b"\0")
    return h.hexdigest()[:16]


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def environment(run: Run) -> None:
    # First, so that the op sections know which peers' rows are lost even where sarkern fails to import below.
    run.data["peer_requirements"] = peer_requirements()
    report_peer_requirements(run.data["peer_requirements"])
    import sarkern

    device = run.device
    machine = {"python": platform.python_version(), "platform": platform.platform(), "cpu_count": os.cpu_count()}
    if device.cuda:
        props = torch.cuda.get_device_properties(device.torch_device)
        machine.update(
            gpu=props.name,
            compute_capability=f"{props.major}.{props.minor}",
            multiprocessors=props.multi_processor_count,
            memory_gib=round(props.total_memory / 2**30, 1),
            l2_mib=round(getattr(props, "L2_cache_size", 0) / MiB, 1),
            cuda=torch.version.cuda,
            driver=_command("nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"),
            clocks=_command(
                "nvidia-smi",
                "--query-gpu=clocks.sm,clocks.max.sm,clocks.mem,temperature.gpu,power.draw,power.limit",
                "--format=csv",
            ),
        )
    else:
        machine.update(gpu=None, torch_threads=torch.get_num_threads())
    # Only this checkout's own repository: a copy of the tree inside another one (the emulation's) has no commit.
    toplevel = _command("git", "-C", str(ROOT), "rev-parse", "--show-toplevel")
    own = toplevel is not None and Path(toplevel).resolve() == ROOT.resolve()
    commit = _command("git", "-C", str(ROOT), "rev-parse", "HEAD") if own else None
    dirty = _command("git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no")
    run.data["machine"] = machine
    run.data["versions"] = {
        "torch": torch.__version__,
        "triton": _version("triton"),
        **{peer: _version(peer) for peer in PEERS},
        "torch_linear_cross_entropy": hasattr(torch.nn.functional, "linear_cross_entropy"),
    }
    run.data["sarkern"] = {
        "version": sarkern.__version__,
        "commit": commit or "unknown (no git checkout here)",
        "dirty": bool(dirty) if commit else None,
        "source_digest": source_digest(),
        "imported_from": str(Path(sarkern.__file__).parent),
        "check_inputs": "check_inputs" in inspect.signature(sarkern.linear_token_logprobs).parameters,
        "backends": list(run.settings.backends),
    }
    # Refused up front, by name, rather than failing (or crashing a section's process) in the middle of its rows.
    from sarkern.backends import interpreter_problem  # the installed copy's check, as its ops would refuse

    refused = interpreter_problem() if "triton" in run.settings.backends else None
    run.data["sarkern"]["refused_backends"] = {"triton": refused} if refused else {}
    run.data["primary_sarkern"] = primary_sarkern(run)
    for key in ("machine", "versions", "sarkern"):
        print(f"   {key}: {json.dumps(run.data[key], default=str)}", flush=True)
    if refused:
        print(f"   sarkern[triton] REFUSED: {refused}", flush=True)
