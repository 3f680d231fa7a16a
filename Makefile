# Two commands on a fresh machine: `make lab` opens the labs, `make test` runs every check.
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: lab test lint handouts bench

$(VENV)/.installed: requirements.txt requirements-dev.txt pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt -e .
	touch $@

lab: $(VENV)/.installed
	$(VENV)/bin/jupyter lab --ip 127.0.0.1 labs/

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: lint
	$(VENV)/bin/pytest

bench: $(VENV)/.installed
	$(PY) benchmarks/startup.py
