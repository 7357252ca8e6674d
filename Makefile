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

# Two worker processes (pytest-xdist) share the tests: CI has two cores, and no one process
# compiles the XLA CPU programs of the whole suite (in one process, a compile late in the
# suite once exhausted a per-process resource and segfaulted). `--dist loadgroup` keeps the
# tests of a module marked `xdist_group` in one worker, so that worker alone computes the
# module's expensive fixtures (a documentation build, a pip install, a ResNet).
test: setup
	$(BIN)/python -m pytest -n 2 --dist loadgroup --durations=25 tests plugins

bench: setup
	$(BIN)/python benchmarks/smoke.py --json benchmarks/smoke.json

clean:
	rm -rf $(VENV)
