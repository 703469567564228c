# `make run` and `make test` work on a fresh machine with python3, gcc and make.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=
PYTEST_ARGS ?=
FWD_TEST_WORKERS ?= 1

.PHONY: setup run test lint bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml setup.py fwd/_fastcopy.pyx
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $@

run: setup
	$(BIN)/fwd-server $(ARGS)

# FWD_TEST_WORKERS=3 runs every server the tests start with three workers.
test: setup
	FWD_TEST_WORKERS=$(FWD_TEST_WORKERS) $(BIN)/python -m pytest $(PYTEST_ARGS)

# ruff and mypy, pinned in the `lint` extra; CI runs this first.
lint: setup
	$(BIN)/python -m pip install -q -e '.[lint]'
	$(BIN)/ruff check fwd bench tests
	$(BIN)/python -m mypy fwd bench

bench: setup
	$(BIN)/python -m pytest bench --benchmark-only $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info fwd/_fastcopy.c fwd/*.so
