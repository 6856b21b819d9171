# The two commands a newcomer runs: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
WORKDIR ?= workdir/demo
STAMP := $(VENV)/.installed

.PHONY: demo test lint format install clean bench browser docs

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

# The web page test drives Debian's Chromium through Playwright (no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || { \
	  echo "installing Debian's chromium for the browser test"; \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
	  || echo "warning: could not install chromium; the browser test will be skipped"; }

# The user guide (docs/) as a site in site/; --strict: a broken link or anchor fails.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

test: lint browser docs
	$(BIN)/python -m pytest $(PYTEST_ARGS)

clean:
	rm -rf workdir site .pytest_cache .ruff_cache
