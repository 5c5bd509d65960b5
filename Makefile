# User entry points. Every target that runs Python depends on .venv, so each works from a
# fresh clone with no other step.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test lint format bench clean-venv

setup: $(STAMP)

# Re-runs only when the pins or the package metadata change.
$(STAMP): requirements.txt pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.txt
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format: $(STAMP)
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

test: lint
	$(PY) -m pytest $(PYTEST_ARGS)

BENCH_OUT ?= bench
bench: $(STAMP)
	$(PY) -m eval.bench_moe --json $(BENCH_OUT)/bench_moe.json --markdown $(BENCH_OUT)/bench_moe.md

clean-venv:
	rm -rf $(VENV)
