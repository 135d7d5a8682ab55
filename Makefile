# podiam's developer entry points. Each target sets up what it needs from nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test lint demo protos clean

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

protos: setup
	$(BIN)/python -m protos.generate

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
