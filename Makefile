# One entry point for people and CI: `make up` runs mlfe, `make test` runs every check.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
# `pip install 'mlfe[azureml]'` in an environment of its own (its pins would move the dev
# venv's packages back); tests run Microsoft's azmlinfsrv from it (MLFE_AZMLINFSRV_PYTHON).
AZUREML_VENV ?= .venv-azureml

.PHONY: setup up test lint typecheck bench clean compile uncompile test-compiled

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

test: lint typecheck uncompile
	$(BIN)/pytest
	$(MAKE) test-compiled

# The scoring path compiled with mypyc, in place (.so beside the .py; Python prefers them).
# `make uncompile` goes back to pure Python. setup.py lists the modules.
compile: setup
	MLFE_MYPYC=1 $(BIN)/python setup.py -q build_ext --inplace

uncompile:
	rm -rf router/*.so *__mypyc*.so build

# The tests of the scoring path once more, against the compiled build; then pure again. (The
# whole suite runs on pure Python; these are the ones that drive the compiled modules.)
COMPILED_TESTS := tests/test_build.py tests/test_http_protocol.py tests/test_scoring.py \
	tests/test_accesslog.py tests/test_requestid.py tests/test_observability.py \
	tests/test_endpoints.py tests/test_token_auth.py tests/test_benchmarks.py
test-compiled: compile
	MLFE_EXPECT_COMPILED=1 $(BIN)/pytest $(COMPILED_TESTS); status=$$?; \
	$(MAKE) uncompile; exit $$status

bench: setup
	$(BIN)/python -m benchmarks.overhead

clean: uncompile
	rm -rf $(VENV) $(AZUREML_VENV) .mlfe .pytest_cache .mypy_cache .ruff_cache build
