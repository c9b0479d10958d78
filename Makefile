# Two entry points for a fresh machine: `make run` (the main job on the CPU default) and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip -q

# torch==2.13.0 first: the CPU wheel on this disk; then the project, whose torch>=2.6 is then satisfied.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[train,envs,gem,dev]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/tidal run

lint: $(STAMP)
	$(BIN)/ruff check tidal engine trainer envs protocol bench tests

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV)
