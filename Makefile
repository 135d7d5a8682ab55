# podiam's developer entry points. Each target sets up what it needs from nothing.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test lint demo up protos bench bench-quick images clean clients

setup: $(VENV)/.installed

# Each slow step says what it does before it starts, and pip shows what it installs, so the
# first run (about 90 s) is never silent.
$(VENV)/.installed: pyproject.toml
	@echo "==> creating the virtualenv $(VENV)"
	$(PYTHON) -m venv $(VENV)
	@echo "==> upgrading pip"
	$(BIN)/pip install --quiet --upgrade pip
	@echo "==> installing podiam (editable) and its test dependencies into $(VENV), about a minute"
	$(BIN)/pip install --progress-bar off --editable '.[test]'
	@echo "==> $(VENV) is ready: '. $(VENV)/bin/activate' puts podiam-server, podiam-agent, podiam-certs on PATH"
	touch $@

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

test: lint
	$(BIN)/pytest

# The SDK matrix's clients (tests/clients/), built outside the work tree; a no-op when up to date.
clients:
	tests/clients/build.sh

demo: setup
	@echo "==> running the demo"
	$(BIN)/python -m demo

# A local stack that stays up until Ctrl-C: agent, server, their metrics, and locust to load it.
up: $(VENV)/.bench
	$(BIN)/python -m demo.up

$(VENV)/.bench: $(VENV)/.installed
	@echo "==> installing the bench extras (locust, uvloop, py-spy, pyinstrument) into $(VENV)"
	$(BIN)/pip install --progress-bar off --editable '.[test,bench]'
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
