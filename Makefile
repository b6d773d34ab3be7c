# `make test` works on a fresh machine: it creates .venv, installs sarkern with what the tests need, and runs them.
# The venv sees the system's site-packages, so a CUDA build of torch that is already installed is kept; without
# any torch, the pinned CPU-friendly wheel is installed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.sarkern-installed

.PHONY: install test test-oldest test-fast bench train lint clean static-report gpu-wheels gpu-check

$(PY):
	$(PYTHON) -m venv --system-site-packages $(VENV)

$(STAMP): setup.py | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install "$(TORCH_SPEC)"
	$(PY) -m pip install -e ".[dev,train]"
	touch $(STAMP)

install: $(STAMP)

test: $(STAMP)
	$(PY) -m pytest tests

# The oldest transformers setup.py admits (TRL 1.16's own floor), tested in a second, light venv that shares .venv's
# packages through a .pth file and holds only what that release needs to differ: transformers 4.x wants tokenizers
# <= 0.23.0 and huggingface_hub < 1.0, and datasets 5.x wants huggingface_hub >= 1.31, so datasets (4.8.5, with the
# fsspec and httpx it pins) differs too. Runs the scorer, trainer, CLI, tiny-model and TRL drop-in tests (~3 min).
OLDEST_VENV ?= .venv-oldest
OLDEST_PY := $(OLDEST_VENV)/bin/python
OLDEST_TRANSFORMERS ?= 4.56.2
OLDEST_PINS ?= transformers==$(OLDEST_TRANSFORMERS) tokenizers==0.22.2 huggingface_hub==0.36.2 datasets==4.8.5 \
	fsspec==2026.2.0 httpx==0.28.1 httpcore==1.0.9
OLDEST_STAMP := $(OLDEST_VENV)/.sarkern-oldest-installed
OLDEST_TESTS ?= tests/test_scorer.py tests/test_tiny_model.py tests/test_cli.py tests/test_trl_dropin.py \
	tests/test_trainer.py::test_sar_is_scored_logged_and_enters_the_advantages \
	tests/test_trainer.py::test_old_logprobs_are_reused_when_the_trainer_has_them \
	tests/test_trainer.py::test_trainer_with_a_peft_lora_policy

$(OLDEST_STAMP): $(STAMP) Makefile
	rm -rf $(OLDEST_VENV)
	$(PYTHON) -m venv --system-site-packages $(OLDEST_VENV)
	$(OLDEST_PY) -c "import sysconfig; print('import site; site.addsitedir(%r)' % '$(abspath $(VENV))' \
		.join(sysconfig.get_paths()['purelib'].rsplit('$(abspath $(OLDEST_VENV))', 1)))" \
		> "$$($(OLDEST_PY) -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/_sarkern_shared_venv.pth"
	$(OLDEST_PY) -m pip install --quiet --no-deps $(OLDEST_PINS)
	$(OLDEST_PY) -c "import importlib.metadata as m, sarkern, torch, trl; \
		assert m.version('transformers') == '$(OLDEST_TRANSFORMERS)', m.version('transformers'); \
		print('oldest venv: transformers', m.version('transformers'), '| torch', torch.__version__, '| trl', \
		trl.__version__, '| sarkern from', sarkern.__file__)"
	touch $(OLDEST_STAMP)

test-oldest: $(OLDEST_STAMP)
	$(OLDEST_PY) -m pytest $(OLDEST_TESTS)

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
	rm -rf $(VENV) $(OLDEST_VENV) build *.egg-info .pytest_cache

# ---- A GPU window (DESIGN.md section 6) -------------------------------------------------------------------------
# Here (PyPI reachable): `make gpu-wheels` puts the pure-Python peers, and what of their needs the GPU image lacks,
# into $(GPU_WHEELS) (ignored by git; a few MB, under the device tool's 64 MiB carry limit). Never torch, Triton or
# nvidia-*: the GPU image has its own CUDA builds. Liger's SM90 fused scaled cross entropy would need NVIDIA's CuTe
# DSL (nvidia-cutlass-dsl-libs-cu13, a 92 MB wheel): too big to carry, so that contender reports it as missing.
# On the GPU machine: `make gpu-check` with $(GPU_WHEELS) carried. It runs the system python (torch 2.11 + Triton 3.6
# there), never .venv (made here for the CPU); the script installs the wheels and this checkout's sarkern into
# temporary folders without network, and writes the results to $$OUT when the device tool sets it (else
# benchmarks/results). Without make: python3 benchmarks/gpu_check.py --wheels .gpu-wheels --out "$$OUT" (the entry
# script of the package benchmarks/gpucheck/).
GPU_PYTHON ?= python3
GPU_WHEELS ?= .gpu-wheels
GPU_CHECK_OUT ?= $(if $(OUT),$(OUT),benchmarks/results)
GPU_PY_VERSION ?= 3.12
GPU_PEERS ?= trl==1.16.0 liger-kernel==0.8.5 cut-cross-entropy==25.1.1 datasets==5.2.0 dill==0.4.1 \
	multiprocess==0.70.19

gpu-wheels:
	rm -rf $(GPU_WHEELS)
	$(PYTHON) -m pip download --quiet --no-deps --only-binary=:all: --python-version $(GPU_PY_VERSION) \
		--implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux2014_x86_64 --platform any -d $(GPU_WHEELS) $(GPU_PEERS)
	@du -sh $(GPU_WHEELS); ls $(GPU_WHEELS)

gpu-check: SHELL := /bin/bash
gpu-check:
	mkdir -p $(GPU_CHECK_OUT)
	set -o pipefail; PYTHONUNBUFFERED=1 $(GPU_PYTHON) benchmarks/gpu_check.py --wheels $(GPU_WHEELS) \
		--out $(GPU_CHECK_OUT) $(GPU_CHECK_ARGS) 2>&1 | tee $(GPU_CHECK_OUT)/gpu-check.log
