# podiam's developer entry points. Each target sets up what it needs from nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test lint demo protos bench bench-quick images clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --editable '.[test]'
	touch $@

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest

demo: setup
	$(BIN)/python -m tests.demo

$(VENV)/.bench: $(VENV)/.installed
	$(BIN)/pip install --quiet --editable '.[test,bench]'
	touch $@

bench: $(VENV)/.bench
	$(BIN)/python -m bench --out bench-report.md --json bench-report.json $(BENCH_ARGS)

bench-quick: $(VENV)/.bench
	$(BIN)/python -m bench --quick --out bench-report.md $(BENCH_ARGS)

# Both images with podman, on a Python base made from Debian packages (images/build.sh); set
# PODIAM_PYTHON_IMAGE=python:3.11-slim-bookworm to build on the official image instead.
images:
	bash images/build.sh

protos: setup
	$(BIN)/python -m protos.generate

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
