# nanochat-run: install, test, demo, lint.
# GPU machines: `make install-cuda` (CUDA=cu126 etc. for another CUDA build) replaces the CPU build of torch that
# `make install` puts in by default; the default never downloads CUDA wheels (CI and laptops stay small).
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
TORCH_SPEC ?= torch==$(TORCH_VERSION)
CUDA ?= cu128
BIN := $(VENV)/bin
export NANOCHAT_BASE_DIR ?= $(HOME)/.cache/nanochat

.PHONY: install install-cuda torch chromium slurm test test-fast demo lint bench gpu-check clean

install: $(VENV)/.installed torch

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[test]"
	test -f $(VENV)/.torch-spec || echo '$(TORCH_SPEC)' > $(VENV)/.torch-spec
	touch $@

# The torch build is part of the install: a TORCH_SPEC given on the command line that differs from the one installed
# replaces it (--force-reinstall: pip alone counts an installed 2.13.0+cpu as satisfying torch==2.13.0 from a CUDA
# index). A later plain `make test` keeps whatever build is installed.
torch: $(VENV)/.installed
ifneq ($(origin TORCH_SPEC),file)
	@if [ "$$(cat $(VENV)/.torch-spec 2>/dev/null)" != '$(TORCH_SPEC)' ]; then \
	  echo "replacing the installed torch with: $(TORCH_SPEC)"; \
	  $(BIN)/pip install -q --force-reinstall $(TORCH_SPEC) && echo '$(TORCH_SPEC)' > $(VENV)/.torch-spec; \
	fi
endif

install-cuda:  # the CUDA build of torch; fails loudly if what got installed is not one
	$(MAKE) install TORCH_SPEC="torch==$(TORCH_VERSION)+$(CUDA) --index-url https://download.pytorch.org/whl/$(CUDA)"
	$(BIN)/python -c "import torch, sys; sys.exit(0 if torch.version.cuda else 'torch ' + torch.__version__ + \
	  ' is still a CPU build')"; $(BIN)/python -c "import torch; print('torch', torch.__version__, 'CUDA', \
	  torch.version.cuda, '|', torch.cuda.device_count(), 'GPU(s) usable now')"

chromium:  # Debian's Chromium, which tests/test_chat_web.py drives (the test skips without it, except in CI)
	@test -x /usr/bin/chromium || { apt-get update -q && apt-get install -y -q --no-install-recommends chromium; }

slurm:  # a one-machine SLURM (controller, node daemon, client tools) and munge, for tests/test_slurm.py (root, Debian)
	@for t in slurmctld slurmd munged sbatch scontrol scancel squeue sinfo; do \
	  command -v $$t >/dev/null || missing=1; done; \
	  test -z "$$missing" || { apt-get update -q && apt-get install -y -q --no-install-recommends slurm-wlm munge; }

# Two workers (pytest-xdist): most tests wait on real processes, signals and timeouts, so two at a time fit a
# 2-core machine (~15 minutes: 867 tests in 911 s on 2 quiet cores). Each worker builds the shared runs once
# (tests/runs.py built_once).
test: install
	$(BIN)/python -m pytest -q -n 2

test-fast: install
	$(BIN)/python -m pytest -q -n 2 -m "not slow"

demo: install
	$(BIN)/python -m scripts.demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install  # ~50 minutes on 2 cores; each script prints ratios measured side by side
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python -m scripts.bench_train
	$(BIN)/python -m scripts.bench_checkpoint
	$(BIN)/python -m scripts.bench_writer
	$(BIN)/python -m scripts.bench_recovery
	$(BIN)/python -m scripts.bench_chat
	$(BIN)/python -m scripts.bench_rl
	$(BIN)/python -m scripts.bench_storage
	$(BIN)/python -m scripts.bench_health
	$(BIN)/python -m scripts.bench_goodput --quick
	$(BIN)/python -m scripts.bench_mask

# What only a GPU can show, in one table (scripts/gpu_check.py; under 10 minutes on one GPU). It runs on the first
# Python whose torch sees a CUDA GPU: .venv's (after `make install-cuda`), else $(PYTHON) (a GPU image with torch
# already in it). A machine with no network gets the packages that Python lacks from WHEELS=<a folder of wheels>.
# With no CUDA GPU anywhere, the script refuses in one line. GPU_CHECK_ARGS="--device cpu" checks the plumbing.
WHEELS ?=
GPU_CHECK_ARGS ?=
gpu-check:
	@py=; for p in $(BIN)/python $(PYTHON); do \
	  if $$p -c 'import torch, sys; sys.exit(not torch.cuda.is_available())' 2>/dev/null; then py=$$p; break; fi; \
	done; \
	if [ -z "$$py" ]; then py=$(BIN)/python; [ -x "$$py" ] || py=$(PYTHON); fi; \
	if [ -n "$(WHEELS)" ]; then \
	  $$py -m pip install -q --no-index --no-deps --target $(VENV)/gpu-site $(WHEELS)/*.whl || exit 1; \
	  export PYTHONPATH=$(CURDIR)/$(VENV)/gpu-site; \
	fi; \
	echo "gpu-check: $$py"; $$py -m scripts.gpu_check $(GPU_CHECK_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache
