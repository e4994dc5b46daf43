# Two entry points for a fresh machine with Python 3.11 and pip: `make serve` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000
# Extra pip arguments for torch, e.g. a CPU-only index on a Linux machine without CUDA (PyPI's
# default Linux wheel is the CUDA build, several GB):
#   TORCH_PIP_ARGS="--index-url https://download.pytorch.org/whl/cpu" make setup
TORCH_PIP_ARGS ?=

.PHONY: setup serve test lint bench lock clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

# torch 2.13.0 first, so the range in pyproject.toml is already satisfied and pip never pulls
# another build; then every other dependency pinned by the lock file; then the project itself.
$(VENV)/.installed: pyproject.toml requirements-dev.lock | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PIP_ARGS) torch==2.13.0
	$(BIN)/pip install --quiet -r requirements-dev.lock
	$(BIN)/pip install --quiet --no-deps -e .
	touch $@

setup: $(VENV)/.installed

# The bundled reference demo answers requests that name no model (FLOW_DEFAULT_MODEL overrides).
serve: setup
	FLOW_DEFAULT_MODEL=$${FLOW_DEFAULT_MODEL:-four-gaussians} \
		$(BIN)/python -m service --host $(HOST) --port $(PORT)

test: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .

bench: setup
	$(BIN)/python -m bench.throughput

# Refresh the lock files from pyproject.toml (torch is pinned above, not locked).
LOCK = $(BIN)/pip-compile --quiet --strip-extras --no-emit-index-url --no-emit-find-links \
	--unsafe-package torch pyproject.toml
lock: setup
	$(BIN)/pip install --quiet pip-tools
	$(LOCK) --output-file requirements.lock
	$(LOCK) --extra ray --output-file requirements-ray.lock
	$(LOCK) --extra dev --extra ray --output-file requirements-dev.lock

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
