"""The oldest transformers setup.py admits is the one `make test-oldest` tests, and TRL admits it too."""

import re
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent


def _setup_floor() -> Version:
    text = (ROOT / "setup.py").read_text(encoding="utf-8")
    (floor,) = re.findall(r'"transformers>=([0-9.]+)"', text)
    return Version(floor)


def test_the_admitted_floor_is_the_tested_version():
    (tested,) = re.findall(r"^OLDEST_TRANSFORMERS \?= ([0-9.]+)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert _setup_floor() == Version(tested)


def test_trl_admits_the_floor():
    """A floor below TRL's would admit a transformers that pip then refuses (or that TRL does not support)."""
    needs = [Requirement(r) for r in metadata.requires("trl") or []]
    transformers = [r for r in needs if r.name == "transformers" and r.marker is None]
    assert transformers, "TRL names no transformers requirement"
    for requirement in transformers:
        assert requirement.specifier.contains(_setup_floor()), (requirement, _setup_floor())
