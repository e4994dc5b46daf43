# Two entry points for a fresh machine with Python 3.11 and pip: `make serve` and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup serve test lint bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

# The CPU build of torch is pinned before anything else so the range in pyproject.toml is already
# satisfied and pip never pulls a CUDA wheel.
$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
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

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
