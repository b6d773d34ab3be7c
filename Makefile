# `make test` works on a fresh machine: it creates .venv, installs sarkern with what the tests need, and runs them.
# The venv sees the system's site-packages, so a CUDA build of torch that is already installed is kept; without
# any torch, the pinned CPU-friendly wheel is installed.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.sarkern-installed

.PHONY: install test test-oldest test-fast bench train lint clean static-report gpu-wheels gpu-check gpu-emulation \
	gpu-emulation-tests

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
# fsspec and httpx it pins) differs too. Runs the scorer, placeholder, trainer, CLI, tiny-model and TRL drop-in tests
# (~1-3 min).
OLDEST_VENV ?= .venv-oldest
OLDEST_PY := $(OLDEST_VENV)/bin/python
OLDEST_TRANSFORMERS ?= 4.56.2
OLDEST_PINS ?= transformers==$(OLDEST_TRANSFORMERS) tokenizers==0.22.2 huggingface_hub==0.36.2 datasets==4.8.5 \
	fsspec==2026.2.0 httpx==0.28.1 httpcore==1.0.9
OLDEST_STAMP := $(OLDEST_VENV)/.sarkern-oldest-installed
OLDEST_TESTS ?= tests/test_scorer.py tests/test_tiny_model.py tests/test_cli.py tests/test_trl_dropin.py \
	tests/test_placeholder.py tests/test_paper_preset.py tests/test_cli_paper.py tests/test_sar_reward.py \
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

# ---- A GPU window ----------------------------------------------------------------------------------------------
# The call to send (command, carry list, timeout) is in benchmarks/GPU_WINDOW.md, the one place it is written.
# Here (PyPI reachable): `make gpu-wheels` puts the pure-Python peers, and what of their needs the GPU image lacks,
# into $(GPU_WHEELS) (ignored by git; a few MB, under the device tool's 64 MiB carry limit). Never torch, Triton or
# nvidia-*: the GPU image has its own CUDA builds. Liger's SM90 fused scaled cross entropy would need NVIDIA's CuTe
# DSL (nvidia-cutlass-dsl-libs-cu13, a 92 MB wheel): too big to carry, so that contender reports it as missing.
# On a GPU machine with make: `make gpu-check` runs the same script as GPU_WINDOW.md's command with the system
# python (never .venv, made here for the CPU), its output also in $(GPU_CHECK_OUT)/gpu-check.log.
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

# The dry run of a GPU window on this CPU (not in CI, not in `make test`: torch's CUDA build is several GB). It builds
# an emulation of the GPU image in $(GPU_IMAGE) (ignored): a venv of Python $(GPU_PY_VERSION) (python3.12 on the PATH,
# else pyenv's, else uv's; GPU_IMAGE_PY=... to choose) with $(GPU_IMAGE_SPECS) and nothing of sarkern's. Then it
# copies the working tree as the device tool does (tracked files and untracked ones git does not ignore, the wheels
# carried), and runs GPU_WINDOW.md's command, read from that file, with --tiny in that copy, `python3` being the
# emulation's, no PYTHONPATH. GPU_IMAGE_EXTRA: packages the image may have beyond these (say, `pyarrow pandas
# xxhash`, which datasets needs: without them the TRL rows are refused by name). Results in $(GPU_IMAGE)/out. Built
# once (a stamp): rm -rf $(GPU_IMAGE) after changing the versions.
GPU_IMAGE ?= .gpu-image
GPU_IMAGE_SPECS ?= torch==2.11.0 triton==3.6.0 transformers==5.17.0 accelerate==1.15.0 numpy==2.5.2 pytest
GPU_IMAGE_EXTRA ?=
GPU_EMULATION_ARGS ?= --tiny --budget-scale 20
GPU_IMAGE_PY ?= $(shell for p in python$(GPU_PY_VERSION) $$(ls -d $$HOME/.pyenv/versions/$(GPU_PY_VERSION).*/bin 2>/dev/null \
	| sort -V | tail -1)/python$(GPU_PY_VERSION) $$(uv python find $(GPU_PY_VERSION) 2>/dev/null); do \
	$$p -c 'import sys; sys.exit(sys.version_info[:2] != tuple(map(int, "$(GPU_PY_VERSION)".split("."))))' \
	2>/dev/null && echo $$p && break; done)
GPU_IMAGE_STAMP := $(GPU_IMAGE)/.built

$(GPU_IMAGE_STAMP):
	@test -n "$(GPU_IMAGE_PY)" || { echo "no Python $(GPU_PY_VERSION) found (set GPU_IMAGE_PY=...)"; exit 1; }
	$(GPU_IMAGE_PY) -m venv $(GPU_IMAGE)/venv
	$(GPU_IMAGE)/venv/bin/python -m pip install --quiet $(GPU_IMAGE_SPECS) $(GPU_IMAGE_EXTRA)
	$(GPU_IMAGE)/venv/bin/python -m pip list --format=freeze > $(GPU_IMAGE)/versions.txt
	touch $@

gpu-emulation: SHELL := /bin/bash
gpu-emulation: $(GPU_IMAGE_STAMP)
	@test -d $(GPU_WHEELS) || { echo "no $(GPU_WHEELS)/: run make gpu-wheels first"; exit 1; }
	rm -rf $(GPU_IMAGE)/tree $(GPU_IMAGE)/out && mkdir -p $(GPU_IMAGE)/tree $(GPU_IMAGE)/out
	git ls-files -z -co --exclude-standard | tar --null --ignore-failed-read -T - -cf - | tar -xf - -C $(GPU_IMAGE)/tree
	cp -r $(GPU_WHEELS) $(GPU_IMAGE)/tree/
	command="$$(sed -n 's/^command: //p' benchmarks/GPU_WINDOW.md)"; echo "$$command $(GPU_EMULATION_ARGS)"; \
	set -o pipefail; cd $(GPU_IMAGE)/tree && env -u PYTHONPATH -u VIRTUAL_ENV -u SARKERN_BACKEND \
		PATH="$(abspath $(GPU_IMAGE))/venv/bin:$$PATH" OUT="$(abspath $(GPU_IMAGE))/out" \
		bash -c "$$command $(GPU_EMULATION_ARGS)" 2>&1 | tee $(abspath $(GPU_IMAGE))/out/gpu-check.log

# The suite's CPU tests of the ops and the scorer under the emulation's interpreter, against a plain (not editable)
# install of this checkout in $(GPU_IMAGE)/site (with hypothesis, which the tests need and the image lacks).
GPU_EMULATION_TESTS ?= tests/test_token_logprobs.py tests/test_linear_token_logprobs.py \
	tests/test_sequence_perplexity.py tests/test_op_errors.py tests/test_scorer.py tests/test_scorer_paths.py \
	tests/test_scorer_precision.py tests/test_sar_reward.py tests/test_flex_attention.py
gpu-emulation-tests: $(GPU_IMAGE_STAMP)
	rm -rf $(GPU_IMAGE)/site
	$(GPU_IMAGE)/venv/bin/python -m pip install --quiet --no-deps --no-build-isolation --target $(GPU_IMAGE)/site .
	$(GPU_IMAGE)/venv/bin/python -m pip install --quiet --target $(GPU_IMAGE)/site hypothesis
	cd tests && env -u SARKERN_BACKEND PYTHONSAFEPATH=1 PYTHONPATH="$(abspath $(GPU_IMAGE))/site" \
		$(abspath $(GPU_IMAGE))/venv/bin/python -m pytest -p no:cacheprovider --rootdir .. -c ../pytest.ini \
		$(patsubst tests/%,%,$(GPU_EMULATION_TESTS)) $(GPU_EMULATION_TESTS_ARGS)
