# nanochat-run: install, test, demo, lint.
# GPU users: make install TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
# (or any CUDA build you prefer); the default below is the CPU build and never downloads CUDA wheels.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
export NANOCHAT_BASE_DIR ?= $(HOME)/.cache/nanochat

.PHONY: install test test-fast demo lint bench clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q $(TORCH_SPEC)
	$(BIN)/pip install -q -e ".[test]"
	touch $@

test: install
	$(BIN)/python -m pytest -q

test-fast: install
	$(BIN)/python -m pytest -q -m "not slow"

demo: install
	$(BIN)/python -m scripts.demo

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: install  # ~20 minutes on 2 cores; each script prints ratios measured side by side
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python -m scripts.bench_train
	$(BIN)/python -m scripts.bench_checkpoint
	$(BIN)/python -m scripts.bench_writer
	$(BIN)/python -m scripts.bench_recovery

clean:
	rm -rf $(VENV) .pytest_cache
