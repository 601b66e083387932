# One entry point for people and CI: `make up` runs mlfe, `make test` runs every check.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# `pip install 'mlfe[azureml]'` in an environment of its own (its pins would move the dev
# venv's packages back); tests run Microsoft's azmlinfsrv from it (MLFE_AZMLINFSRV_PYTHON).
AZUREML_VENV ?= .venv-azureml

.PHONY: setup up test lint typecheck bench clean

setup: $(VENV)/.installed $(AZUREML_VENV)/.installed

$(VENV)/.installed: pyproject.toml scripts/system-deps
	scripts/system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev,examples,bench]'
	touch $@

$(AZUREML_VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(AZUREML_VENV)
	$(AZUREML_VENV)/bin/pip install -q --upgrade pip
	$(AZUREML_VENV)/bin/pip install -q '.[azureml]'
	touch $@

# `mlfe up` needs only mlfe's own venv (Microsoft's server is for the tests and for users who
# choose `replica_server: azureml`).
up: $(VENV)/.installed
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
	rm -rf $(VENV) $(AZUREML_VENV) .mlfe .pytest_cache .mypy_cache .ruff_cache
