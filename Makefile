# The front door. `make` lists the targets.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.DEFAULT_GOAL := help
.PHONY: help install run test test-slow lint bench soak clean

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test]'
	@touch $(STAMP)

install: $(STAMP) ## make .venv and install coordinator (editable) with its test tools

run: $(STAMP) ## run the supervisor on the embedded workspace with the offline demo team
	$(BIN)/coordinator -w . demo-intro
	$(BIN)/coordinator -w . supervise

# The suite runs on as many workers as there are cores, at most 4 (each test has its own temp
# folders and processes); `.venv/bin/python -m pytest tests/test_x.py` runs one file in one process.
test: $(STAMP) ## run the test suite (slow tests excluded)
	$(BIN)/python -m pytest -q -n auto --maxprocesses 4

test-slow: $(STAMP) ## run only the slow tests (soak, 20,000-file intake, long fault injection)
	$(BIN)/python -m pytest -q -m slow

lint: $(STAMP) ## ruff and mypy
	$(BIN)/ruff check coordinator tests bench
	$(BIN)/mypy

bench: $(STAMP) ## run the benchmarks and print the figures
	$(BIN)/python -m bench

soak: $(STAMP) ## an hour of steady drops into a live supervisor: memory, fds and children must stay flat
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
