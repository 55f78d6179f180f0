# Two commands: `make run` trains the main variant, `make test` runs the test suite.
# Both create .venv when it is missing and install the project into it.

VENV    ?= .venv
PYTHON  ?= python3
BIN     := $(VENV)/bin
# Pinned here, not in pyproject.toml (which takes a range): the build the project is tested
# with, so that every machine trains with the same one. Choose another, e.g. for your CUDA:
# `make run TORCH="torch torchvision"`.
TORCH   ?= torch==2.14.1 torchvision==0.29.1
P       ?=

.PHONY: mlproject run test test-slow bench bench-ddp bench-watch bench-compare install install-test install-server install-docs docs server clean-venv

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

$(VENV)/.installed-server: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[server]"
	touch $@

$(VENV)/.installed-docs: $(VENV)/.installed
	$(BIN)/python -m pip install --quiet -e ".[docs]"
	touch $@

install: $(VENV)/.installed
install-test: $(VENV)/.installed-test
install-server: $(VENV)/.installed-server
install-docs: $(VENV)/.installed-docs

# `mlflow run --env-manager local` runs the entry point's `python` from PATH, so the venv
# goes first on PATH. Extra parameters: make run P="-P dataset=synthetic -P max_steps=50"
# `mlflow run` opens its run before our code starts, in MLFLOW_EXPERIMENT_NAME's experiment.
run: install
	MLFLOW_EXPERIMENT_NAME=$${MLFLOW_EXPERIMENT_NAME:-gradient-flow} PATH="$(abspath $(BIN)):$$PATH" $(BIN)/mlflow run . --env-manager local -P skip=false $(P)

# Test processes (pytest-xdist): "auto" is one per CPU core; JOBS=0 runs in this process.
# A test file stays on one process (--dist loadfile), so a module's one server or one pair of
# trained runs is made once. Most of a test's time is a child process importing torch and
# MLflow on one core: 2 processes took the default suite from 9.7 to 6.0 minutes on 2 cores.
JOBS    ?= auto
PYTEST  = PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -n $(JOBS) --dist loadfile

# The default suite (everything but the slow integration tests): under 10 minutes on 2 cores.
test: install-test
	$(PYTEST) -m "not slow" $(PYTEST_ARGS)

# The slow integration tests: real `mlflow run`, servers, PostgreSQL, a browser, killed and
# resumed runs. CI runs them after `make test`.
test-slow: install-test
	$(PYTEST) -m slow $(PYTEST_ARGS)

# The training-step benchmark: the notebook's loop against ours, one table (BENCHMARKS.md).
# On an H200 ~5 min for all 20 rows (15 took 4.4); BENCH_ARGS="--only=eager,probes" picks rows by name
# (the notebook's always runs), "--quick" runs tiny sizes on a CPU in about a minute (CI).
bench: install
	$(BIN)/python bench/train_step.py $(BENCH_ARGS)

# DDP overhead: the training step on 2 gloo ranks against 1 process, on the CPU (BENCHMARKS.md).
bench-ddp: install
	$(BIN)/python bench/ddp.py $(BENCH_ARGS)

# pipeline.watch's overhead against the same plain loop without it, on this machine
# (BENCHMARKS.md); ~2 min; BENCH_ARGS="--compile" adds torch.compile rows (minutes more).
bench-watch: install
	$(BIN)/python bench/watch.py $(BENCH_ARGS)

# Times the compare step on two full-size runs (see BENCHMARKS.md); ~40 s.
bench-compare: install
	$(BIN)/python bench/compare_speed.py

# The documentation site (mkdocs.yml, docs/) into site/. --strict: a broken link or anchor,
# a page missing from the nav, or a reference table the hook cannot make fails the build.
# Read it served: python -m http.server --directory site --bind 127.0.0.1 8000
# (NO_MKDOCS_2_WARNING: Material's banner about MkDocs 2, which the docs extra excludes.)
docs: install-docs
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The team tracking server (docs: Operations, "The team server"): runs and metrics in
# PostgreSQL, artifacts uploaded and downloaded through the server into ARTIFACTS. The
# database must exist; put its password in PGPASSWORD or ~/.pgpass, not in DB_URI. The
# driver is psycopg2 (`.[server]`): keep +psycopg2, as SQLAlchemy 2.1 reads a bare
# postgresql:// as psycopg 3.
# Production: ARTIFACTS=s3://bucket/path (boto3 installed; S3 settings in the server's env).
# More flags: make server HOST=0.0.0.0 SERVER_ARGS="--allowed-hosts mlflow.lan:5000"
DB_URI      ?= postgresql+psycopg2://mlflow@localhost:5432/mlflow
HOST        ?= 127.0.0.1
PORT        ?= 5000
ARTIFACTS   ?= ./mlartifacts
SERVER_ARGS ?=

server: install-server
	$(BIN)/mlflow server --backend-store-uri "$(DB_URI)" --serve-artifacts \
	    --artifacts-destination "$(ARTIFACTS)" --host $(HOST) --port $(PORT) $(SERVER_ARGS)

# MLproject is generated from pipeline/config.py; a test checks the committed file is current.
mlproject: install
	$(BIN)/python -m pipeline.mlproject

clean-venv:
	rm -rf $(VENV)
