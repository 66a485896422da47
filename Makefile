# STORM developer entry points. Everything installs into .venv from nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.storm-installed

.PHONY: setup demo test lint typecheck unit integration soak bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# CPU build of torch first (a plain `torch` would pull a multi-GB CUDA build);
	# on a GPU host: TORCH_SPEC="torch==2.13.0 --index-url <your CUDA wheel index>" make setup
	$(BIN)/pip install --quiet $${TORCH_SPEC:-torch==2.13.0}
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(STAMP)

setup: $(STAMP)

## The main job: a private stormd plus a training worker that offloads into it.
demo: $(STAMP)
	$(BIN)/storm-worker --steps 60 --summary storm-summary.json
	@echo "summary written to storm-summary.json"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

typecheck: $(STAMP)
	$(BIN)/mypy

## Lint, types, the whole test suite (docker tests skip where no engine can start),
## then the long fuzz run once.
test: lint typecheck
	$(BIN)/pytest
	$(BIN)/pytest -m fuzz_long

unit: $(STAMP)
	$(BIN)/pytest tests/unit

integration: $(STAMP)
	$(BIN)/pytest tests/integration

## The long soak: 8 clients x 2000 offload/fetch/free cycles, and the load figures.
soak: $(STAMP)
	$(BIN)/pytest -m slow
	$(BIN)/python -m benchmarks.load

## Every benchmark (step time, control plane, data plane; the GPU one where CUDA exists).
bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info storm-summary.json
