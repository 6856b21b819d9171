# The two commands a newcomer runs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= workdir/demo
STAMP := $(VENV)/.installed

.PHONY: demo test lint format install clean bench

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

# Reinstall only when the project's dependencies change.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/medray demo --workdir $(WORKDIR) $(DEMO_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check platform tests bench jobs
	$(BIN)/ruff format --check platform tests bench jobs

format: $(STAMP)
	$(BIN)/ruff format platform tests bench jobs
	$(BIN)/ruff check --fix platform tests bench jobs

test: lint
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf workdir .pytest_cache .ruff_cache
