"""Making this checkout's sarkern and the carried peers importable on a GPU machine where neither is installed,
and passing that on to the processes started from here (the sections' and pytest's)."""

from __future__ import annotations

import importlib
import importlib.util
import os
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

    An editable install of this checkout is used as it is. Otherwise (the GPU machine's bare copy of the tree, or
    another sarkern installed) the checkout is installed into a temporary folder first, without dependencies or
    network, and put first on the path (also for the pytest subprocess).
    """
    try:
        import sarkern

        where = Path(sarkern.__file__).resolve().parent
        installed_here = os.environ.get(SITE_VARIABLE) and where.parent == Path(os.environ[SITE_VARIABLE]).resolve()
        if (where == ROOT / "sarkern" or installed_here) and importlib.util.find_spec("sarkern.kernels") is not None:
            return
    except ImportError:
        pass
    for name in [m for m in sys.modules if m == "sarkern" or m.startswith("sarkern.")]:
        del sys.modules[name]
    target = Path(tempfile.mkdtemp(prefix="sarkern-site-"))
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
