# Two entry points for a fresh machine: `make run` (the main job on the CPU default) and `make test`.
# The venv is made with the first of python3.13, python3.12, python3.11, python3 that runs and is
# 3.11 or newer (a pyenv shim for a version that is not installed fails to run and is skipped);
# `make PY=/path/to/python3.11` picks one.
PYTHONS := python3.13 python3.12 python3.11 python3
ifeq ($(origin PY), undefined)
PY := $(firstword $(foreach p,$(PYTHONS),$(shell $(p) -c 'import sys; assert sys.version_info >= (3, 11); print(sys.executable)' 2>/dev/null)))
endif
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint clean python

python:
	@if [ -z "$(PY)" ]; then \
		echo "make: no Python 3.11 or newer found (tried $(PYTHONS)); install one, or run make PY=/path/to/python3.11" >&2; \
		exit 2; \
	fi
	@$(PY) -c 'import sys; assert sys.version_info >= (3, 11), f"{sys.executable} is Python {sys.version.split()[0]}; tidal needs 3.11 or newer"' \
		|| { echo "make: PY=$(PY) is not a Python 3.11 or newer" >&2; exit 2; }
	@echo "make: using $(PY) ($$($(PY) --version))"

$(BIN)/python:
	@$(MAKE) --no-print-directory python PY="$(PY)"
	$(PY) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip -q

# torch==2.13.0 first: the CPU wheel on this disk; then the project, whose torch>=2.6 is then satisfied.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e '.[train,envs,gem,dev,wandb,tensorboard]'
	touch $(STAMP)

run: $(STAMP)
	$(BIN)/tidal run

lint: $(STAMP)
	$(BIN)/ruff check tidal engine trainer envs protocol bench tests

test: $(STAMP) lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV)
