# `make test` works on a fresh machine: it creates .venv, installs sarkern with what the tests need, and runs them.
# The venv sees the system's site-packages, so a CUDA build of torch that is already installed is kept; without
# any torch, the pinned CPU-friendly wheel is installed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.sarkern-installed

.PHONY: install test test-fast bench train lint clean static-report

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

$(STAMP): setup.py | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[dev,train]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

# The GPU-only contenders (Liger, Cut Cross-Entropy) come with the bench extra; the suite runs without them.
bench: $(STAMP)
	$(PY) -m pip install -e ".[bench]"
	$(PY) benchmarks/run.py

# Every Triton kernel configuration compiled for sm_90a and sm_80 (no GPU needed): registers, spills, shared memory.
static-report: $(STAMP)
	env -u TRITON_INTERPRET $(PY) -m sarkern.kernels.compile_report --check --out benchmarks/results/kernels-static.md

train: $(STAMP)
	$(VENV)/bin/sarkern train

lint: $(STAMP)
	$(PY) -m ruff check sarkern kernels tests benchmarks

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
