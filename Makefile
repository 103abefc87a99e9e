# Two entry points: `make demo` runs the whole demo pipeline, `make test` runs the tests.
# Both create .venv on first use (torch/torchvision pinned to the builds on this machine's disk).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
DEV_STAMP := $(VENV)/.installed-dev
# dvc runs the stage commands (`python -m pipeline ...`) with the venv's python first on PATH.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: demo test lint setup clean

setup: $(DEV_STAMP)

# The demo needs the package only; tests and lint add the dev tools (5 s more here).
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/pip install --quiet -e .
	touch $(STAMP)

$(DEV_STAMP): $(STAMP)
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $(DEV_STAMP)

demo: $(STAMP)
	$(BIN)/python scripts/demo.py   # dvc repro, stage by stage with an overall progress line, then the table

test: $(DEV_STAMP)
	$(BIN)/python -m pytest -q

lint: $(DEV_STAMP)
	$(BIN)/ruff check pipeline stages tests scripts

clean:
	rm -rf $(VENV)
