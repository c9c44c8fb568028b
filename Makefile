# Every target creates/refreshes the local virtual environment first.
PYTHON ?= python3
VENV ?= .venv
# The CPU wheel; override for a GPU machine, e.g. `make install TORCH_SPEC=torch`.
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: install test test-slow test-all lint format demo clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	$(BIN)/python -m pip install --quiet -e ".[dev]"
	@if $(BIN)/python -m pip show torchvision >/dev/null 2>&1; then \
	  echo "torchvision is installed in $(VENV): it breaks transformers here; remove it" >&2; exit 1; fi
	touch $(STAMP)

install: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check src tests
	$(BIN)/ruff format --check src tests

format: $(STAMP)
	$(BIN)/ruff format src tests
	$(BIN)/ruff check --fix src tests

test: $(STAMP) lint
	$(BIN)/python -m pytest -q -m "not slow"

# Multi-process (torchrun) and other slow end-to-end tests; CI runs them after `make test`.
test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -m slow

test-all: $(STAMP) lint
	$(BIN)/python -m pytest -q

# The whole method on the synthetic world: world -> backbones (cached) -> EVLGen -> held-out evaluation.
demo: $(STAMP)
	$(BIN)/evlgen demo --out runs/demo

clean:
	rm -rf $(VENV) build dist .pytest_cache .ruff_cache
