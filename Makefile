# One command each (README): `make demo` runs the main job on the embedded data,
# `make test` runs the whole suite (lint + tests). Both create/reuse .venv and install
# exactly the pinned requirements once; a second run installs nothing (stamp file).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hbp-installed
MCORE := megatron-core==0.19.2
NPROC ?= 2
PYTEST_ARGS ?=

.PHONY: setup test lint format demo clean-cache

$(STAMP): requirements/cpu.txt requirements/dev.txt requirements/nodeps.txt setup.py pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements/cpu.txt -r requirements/dev.txt
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps -r requirements/nodeps.txt
	# megatron-core >= 0.17 declares Python >= 3.12; its cp311 wheel works (docs/environment.md).
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --ignore-requires-python $(MCORE)
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps --no-build-isolation -e .
	@touch $(STAMP)

setup: $(STAMP)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

test: lint
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

demo: $(STAMP)
	$(BIN)/python tools/demo.py --nproc $(NPROC)

clean-cache:
	rm -rf cache runs
