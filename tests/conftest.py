"""Shared test setup.

Without CUDA, the Triton kernels run under Triton's CPU interpreter. The interpreter is chosen when a kernel is
defined, so TRITON_INTERPRET must be set before `sarkern.kernels` is first imported: here, at collection time.
"""

import os
import socket

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def free_port() -> int:
    """A TCP port free right now, for a multi-process launch's rendezvous (the default 29500 collides when two
    suites run on one machine)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pytest_collection_modifyitems(config, items):
    """Where Triton's interpreter cannot run the kernels (e.g. Triton 3.6 with numpy >= 2.4, as on the GPU image),
    the Triton cases on CPU skip with that reason (sarkern refuses the backend by name there) instead of failing
    deep in the interpreter."""
    from sarkern.backends import interpreter_problem

    problem = interpreter_problem()
    if problem is None:
        return
    skip = pytest.mark.skip(reason=problem)
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if "triton" in params.values() or item.get_closest_marker("triton_interpreter"):
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _restore_accelerate_mixed_precision():
    """transformers 4.x's `TrainingArguments(bf16=True)` writes ACCELERATE_MIXED_PRECISION=bf16 into the process
    environment, and every later TrainingArguments without bf16 or fp16 inherits it: undo that after each test."""
    name = "ACCELERATE_MIXED_PRECISION"
    saved = os.environ.get(name)
    yield
    if saved is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = saved
