# The README's two quick-start commands are `make run` and `make test`; .ci/run runs
# `make lint` (ruff and the type checker) and then `make test`.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# First-party plugin packages installed alongside the core (each has its own pyproject.toml).
PLUGINS := $(wildcard plugins/*/pyproject.toml)
PLUGIN_DIRS := $(foreach p,$(PLUGINS),-e $(dir $(p)))

.PHONY: setup run lint test bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: $(BIN)/python pyproject.toml $(PLUGINS)
	$(BIN)/python -m pip install --quiet -e ".[test]" $(PLUGIN_DIRS)
	touch $@

setup: $(VENV)/.installed

run: setup
	$(BIN)/ev3 run

lint: setup
	$(BIN)/ruff check ev3core tests plugins benchmarks
	$(BIN)/ruff format --check ev3core tests plugins benchmarks
	$(BIN)/mypy ev3core

# The suite runs in two processes: in one process, the XLA CPU programs of some 300 tests
# exhaust a per-process resource and a compile segfaults (seen at the same test every time).
test: setup
	$(BIN)/python -m pytest tests/test_[a-o]*.py
	$(BIN)/python -m pytest tests/test_[p-z]*.py plugins

bench: setup
	$(BIN)/python benchmarks/smoke.py --json benchmarks/smoke.json

clean:
	rm -rf $(VENV)
