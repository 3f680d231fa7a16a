# Two commands on a fresh machine: `make lab` opens the labs, `make test` runs every check.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: lab test lint chromium handouts bench

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt -e .
	touch $@

# JupyterLab refuses to run as root (containers, cloud notebooks, CI runners) unless told it
# may, and opens a browser only where there is a screen to show it on.
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root)
BROWSER_FLAG := $(if $(DISPLAY)$(WAYLAND_DISPLAY)$(filter Darwin,$(shell uname -s)),,--no-browser)

lab: $(VENV)/.installed
	$(VENV)/bin/jupyter lab --ip 127.0.0.1 $(ROOT_FLAG) $(BROWSER_FLAG) labs/

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

# The browser test drives Debian's Chromium (Playwright's own browser download can't work
# offline). Installed here when we are root; elsewhere that test says how to get it.
chromium:
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || \
		(apt-get update -qq && apt-get install -y -qq chromium >/dev/null)

test: lint chromium
	$(VENV)/bin/pytest

bench: $(VENV)/.installed
	$(PY) benchmarks/startup.py
	$(PY) benchmarks/overhead.py --table

handouts: $(VENV)/.installed
	$(PY) scripts/handouts.py
