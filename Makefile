# Two commands: `make run` trains the main variant, `make test` runs the test suite.
# Both create .venv when it is missing and install the project into it.

VENV    ?= .venv
PYTHON  ?= python3
BIN     := $(VENV)/bin
# Pinned here, not in pyproject.toml: on this machine kind pip takes exactly these two
# from local disk; any other version (or uv) downloads gigabytes. Override on other hosts,
# e.g. `make run TORCH="torch torchvision"`.
TORCH   ?= torch==2.14.1 torchvision==0.29.1
P       ?=

.PHONY: run test test-fast bench bench-compare install install-test clean-venv

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# Stamps re-run the install whenever pyproject.toml changes.
$(VENV)/.installed: $(BIN)/python pyproject.toml
	$(BIN)/python -m pip install --quiet $(TORCH)
	$(BIN)/python -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test

# `mlflow run --env-manager local` runs the entry point's `python` from PATH, so the venv
# goes first on PATH. Extra parameters: make run P="-P dataset=synthetic -P max_steps=50"
run: install
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/mlflow run . --env-manager local -P skip=false $(P)

test: install-test
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest $(PYTEST_ARGS)

# The quick loop while developing: everything but the slow integration tests.
test-fast: install-test
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -m "not slow" $(PYTEST_ARGS)

# The training-step benchmark: the notebook's loop against ours, one table (BENCHMARKS.md).
# On a GPU ~3 min; BENCH_ARGS="--quick" runs tiny sizes on a CPU in about a minute (CI).
bench: install
	$(BIN)/python bench/train_step.py $(BENCH_ARGS)

# Times the compare step on two full-size runs (see BENCHMARKS.md); ~40 s.
bench-compare: install
	$(BIN)/python bench/compare_speed.py

clean-venv:
	rm -rf $(VENV)
