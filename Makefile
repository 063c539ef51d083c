# The README's two quick-start commands: `make demo` and `make test` (`make test-all` adds
# the slow end-to-end tests).
# Each creates the virtual environment if needed (torch's local CPU build first,
# so the `torch>=2.4` requirement installs nothing more), then runs.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
OUT    ?= demo_out

.PHONY: setup demo test test-all lint

$(BIN)/sampleclr-scale: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/sampleclr-scale

demo: setup
	$(BIN)/sampleclr-scale demo --out $(OUT)

test: setup
	$(BIN)/python -m pytest -q -m "not slow"

test-all: setup
	$(BIN)/python -m pytest -q

lint: setup
	$(BIN)/ruff check .
