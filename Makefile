# One entry point for people and CI: `make up` runs mlfe, `make test` runs every check.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: setup up test lint typecheck bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/system-deps
	scripts/system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,examples,bench]'
	touch $@

up: setup
	$(BIN)/mlfe up

lint: setup
	$(BIN)/ruff check .
	$(BIN)/lint-imports

typecheck: setup
	$(BIN)/mypy

test: lint typecheck
	$(BIN)/pytest

bench: setup
	$(BIN)/python -m benchmarks.overhead

clean:
	rm -rf $(VENV) .mlfe .pytest_cache .mypy_cache .ruff_cache
