# minibert: `make repro` runs the pipeline, `make test` runs the tests. Both create .venv once.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export MLFLOW_DISABLE_TELEMETRY := true
export DO_NOT_TRACK := 1
export DVC_NO_ANALYTICS := 1

.PHONY: install repro test test-fast bench ui serve lint hooks clean mutation

install: $(STAMP)

# torch 2.13.0 first: it is the CPU wheel on the project machines; the project's own
# requirement (<2.14) is then already satisfied and pip pulls no CUDA build.
$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,hf]'
	$(PY) -m minibert.model.kernels.build   # the C++ CPU kernels (minibert/model/kernels), ~10 s
	touch $@

repro: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/dvc repro

test: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q -ra

test-fast: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q -ra -m "not slow"

bench: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m bench.data
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m bench.train --reference

# Prints the URL of the experiment's training-runs table (MLflow 3 opens a GenAI overview otherwise).
UI_PORT ?= 5000
# Mutation testing of the core modules ([tool.mutmut] in pyproject.toml); slow, so never part of
# `make test`. Narrow it with mutant-name globs: make mutation MUTANTS='minibert.data.pairs*'
MUTANTS ?=
MUTATION_JOBS ?= 1
mutation: install
	$(PY) -m pip install -q -e '.[dev,mutation]'
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/mutmut run --max-children $(MUTATION_JOBS) $(MUTANTS)
	$(VENV)/bin/mutmut export-cicd-stats && cat mutants/mutmut-cicd-stats.json

ui: install
	@$(PY) -m minibert.cli ui-url --base http://127.0.0.1:$(UI_PORT) | sed 's/^/open: /' || true
	$(VENV)/bin/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/mlflow.db --host 127.0.0.1 --port $(UI_PORT)

# The registry's champion over HTTP (`minibert serve`: this .venv's bin on PATH, the project's store).
SERVE_PORT ?= 5001
serve: install
	$(VENV)/bin/minibert serve --port $(SERVE_PORT)

lint: install
	$(VENV)/bin/ruff check .

# Git hooks from .pre-commit-config.yaml: ruff, and DVC's pre-commit / pre-push / post-checkout hooks.
hooks: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(VENV)/bin/pre-commit install --hook-type pre-commit --hook-type pre-push --hook-type post-checkout

# The CI steps in one place (ci/pipeline.py), what .github/workflows/pipeline.yml runs: install, test,
# pull if a DVC remote is configured, `dvc repro`, push on push events, metrics/params diff summary.
.PHONY: ci
ci:
	python3 -m ci.pipeline

clean:
	rm -rf data models checkpoints metrics plots probes mlflow.db mlflow.db.lock mlartifacts .dvc/cache .dvc/tmp mutants
