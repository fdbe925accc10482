# prodcat: `make run` starts the app, `make test` runs every test. Both create .venv on first use.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PORT ?= 8501

.PHONY: run test worker lint bench demo screenshots clean-venv

$(STAMP): requirements.txt requirements-test.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -r requirements.txt -r requirements-test.txt
	touch $(STAMP)

# The pages, the HTTP API (/api/v1) and the sign-in routes on one port: `make run PORT=8600`. On the first run
# `users setup` asks for the first admin account (with sign-in on and no admin yet).
run: $(STAMP)
	$(BIN)/python -m core.cli users setup
	$(BIN)/streamlit run server.py --server.port $(PORT)

worker: $(STAMP)
	$(BIN)/python -m core.jobs.worker

# One pytest process per core (at most 4), each test file in one process: a module's server starts once.
test: $(STAMP)
	$(BIN)/python -m pytest -n auto --maxprocesses 4 --dist loadfile

# Lint, format and types: what CI checks before the tests.
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy

# Every CPU benchmark at quick settings, ~10-15 min on 2 idle cores, then one summary table (status, wall time,
# each script's table); JSON in results/bench/. Quick settings, not those behind docs/benchmarks.md.
bench: $(STAMP)
	$(BIN)/python benchmarks/run_cpu.py

demo: $(STAMP)
	$(BIN)/python -m core.cli demo fashion-mnist --limit 600

screenshots: $(STAMP)
	PRODCAT_SCREENSHOTS=docs/screenshots $(BIN)/python -m pytest tests/e2e

clean-venv:
	rm -rf $(VENV)
