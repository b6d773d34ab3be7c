"""Making this checkout's sarkern and the carried peers importable on a GPU machine where neither is installed,
and passing that on to the processes started from here (the sections' and pytest's)."""

from __future__ import annotations

import atexit
import importlib
import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from . import ROOT

# Folders put first on sys.path here, which the subprocesses need on theirs.
sys_path_additions: list[str] = []
SITE_VARIABLE = "SARKERN_GPU_CHECK_SITE"


def ensure_sarkern_importable() -> None:
    """Import this checkout's sarkern with its kernels as `sarkern.kernels` (setup.py maps `kernels/` there).

    The checkout is installed into a temporary folder, without dependencies or network, and put first on the path
    (also for the sections' processes and pytest's, which find it there through $SARKERN_GPU_CHECK_SITE): on the GPU
    machine, the bare copy of the tree has nothing installed, and here an editable install or another sarkern would
    hide what the GPU machine does. The tests section checks that pytest imported this copy (`gpu_tests.py`).
    """
    if os.environ.get(SITE_VARIABLE):  # a section's process: the parent installed it
        try:
            import sarkern

            where = Path(sarkern.__file__).resolve().parent
            if where.parent == Path(os.environ[SITE_VARIABLE]).resolve():
                return
        except ImportError:
            pass
    for name in [m for m in sys.modules if m == "sarkern" or m.startswith("sarkern.")]:
        del sys.modules[name]
    target = Path(tempfile.mkdtemp(prefix="sarkern-site-"))
    atexit.register(shutil.rmtree, target, ignore_errors=True)  # the sections' processes have ended by then
    print(f"   installing this checkout's sarkern into {target} (no dependencies, no index)", flush=True)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-index",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT),
        ],
        check=True,
    )
    sys.path.insert(0, str(target))
    sys_path_additions.insert(0, str(target))
    os.environ[SITE_VARIABLE] = str(target)  # the sections' processes import this copy, not a new one
    importlib.invalidate_caches()
    importlib.import_module("sarkern")


def install_wheels(folder: Path) -> None:
    """Install the carried peers (`make gpu-wheels`) into a temporary folder, each wheel on its own (one that does
    not fit this Python is reported, the others still install), without dependencies or network."""
    wheels = sorted(folder.glob("*.whl"))
    if not wheels:
        print(f"   no wheels in {folder}/ (make gpu-wheels, then carry it): missing peers show as not installed")
        return
    target = Path(tempfile.mkdtemp(prefix="gpu-check-wheels-"))
    atexit.register(shutil.rmtree, target, ignore_errors=True)
    for wheel in wheels:
        done = subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "-q",
                "--no-index",
                "--no-deps",
                "--no-compile",
                "--target",
                str(target),
                str(wheel),
            ],
            capture_output=True,
            text=True,
        )
        if done.returncode:
            print(f"   could not install {wheel.name}: {done.stderr.strip().splitlines()[-1:]}", flush=True)
    sys.path.insert(0, str(target))
    sys_path_additions.append(str(target))
    importlib.invalidate_caches()
    print(f"   {len(wheels)} carried wheel(s) from {folder}/ installed into {target}", flush=True)


def child_environment() -> dict[str, str]:
    """This process's environment for a subprocess, with the folders installed into first on its PYTHONPATH."""
    paths = [*sys_path_additions, os.environ.get("PYTHONPATH")]
    return {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in paths if p)}


# The peers' rows in the op sections (contenders.py) and the distribution each needs.
PEER_ROWS = {
    "trl": ("trl_chunked", "trl_selective"),
    "liger-kernel": ("liger", "liger_scaled"),
    "cut-cross-entropy": ("cce",),
}
# Whose requirements are checked: the peers, and what they import that the image may lack (TRL imports datasets).
CHECKED = ("trl", "datasets", "liger-kernel", "cut-cross-entropy", "dill", "multiprocess")


def _requirement_class():
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pip's own copy, on an image without packaging
        from pip._vendor.packaging.requirements import Requirement
    return Requirement


def _installed_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def peer_requirements(checked: tuple[str, ...] = CHECKED) -> dict:
    """Each installed peer's requirements against what is importable here (the image plus the carried wheels),
    read from the metadata without importing anything; the peers whose rows are lost, and why.

    A requirement's extras are not followed (`fsspec[http]` is checked as fsspec). A peer is lost when one of its
    own requirements is missing or of a version it excludes, or when one of the checked peers it needs is lost.
    """
    requirement = _requirement_class()
    installed = {name: _installed_version(name) for name in checked}
    unmet: dict[str, list[str]] = {}
    needs: dict[str, set[str]] = {}
    for name, version in installed.items():
        if version is None:
            continue
        for line in importlib.metadata.requires(name) or []:
            req = requirement(line)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            dep = req.name.lower().replace("_", "-")
            needs.setdefault(name, set()).add(dep)
            have = _installed_version(req.name)
            if have is None:
                unmet.setdefault(name, []).append(f"{req} (not installed)")
            elif req.specifier and not req.specifier.contains(have, prereleases=True):
                unmet.setdefault(name, []).append(f"{req} (here {have})")

    def why_lost(name: str, seen: frozenset = frozenset()) -> str | None:
        if name in unmet:
            return f"{name} {installed[name]} needs " + ", ".join(unmet[name])
        for dep in sorted(needs.get(name, ())):
            if dep in installed and dep not in seen:
                reason = why_lost(dep, seen | {name})
                if reason:
                    return reason
        return None

    lost = {}
    for name, version in installed.items():
        if version and (reason := why_lost(name)):
            lost[name] = reason
    rows_lost = {row: f"{peer} is not imported: {lost[peer]}" for peer in lost for row in PEER_ROWS.get(peer, ())}
    return {"installed": installed, "unmet": unmet, "lost": lost, "rows_lost": rows_lost}


def report_peer_requirements(found: dict) -> None:
    if not found["lost"]:
        print("   peers' requirements: all met", flush=True)
        return
    for peer, why in found["lost"].items():
        rows = ", ".join(PEER_ROWS.get(peer, ())) or "no row of its own"
        print(f"   peer {peer} LOST ({rows}): {why}", flush=True)
