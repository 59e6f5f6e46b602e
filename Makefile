# make demo : set up (first time only) and train the default experiment
# make test : set up (first time only) and run the tests
# The virtual environment lives in $(ENTREG_VENV) (default .venv); it is re-used while
# pyproject.toml and the checkout path are unchanged.
ENTREG_VENV ?= .venv
PY := $(ENTREG_VENV)/bin/python

.PHONY: setup demo test lint bench
setup:
	@ENTREG_VENV="$(ENTREG_VENV)" scripts/bootstrap.sh

demo: setup
	$(ENTREG_VENV)/bin/entreg-train

test: setup
	$(PY) -m pytest -q -n 2

lint: setup
	$(ENTREG_VENV)/bin/ruff check entreg tests scripts
	$(ENTREG_VENV)/bin/ruff format --check entreg tests scripts

bench: setup
	$(PY) scripts/bench_entropy.py
	$(PY) scripts/bench_era.py
