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
# Its temp folders (some 0.5 GB of small files, git repositories and workspaces, made and removed
# per run) go to /dev/shm where that is a RAM file system with 2 GB free: on a disk that holds freed
# inodes back (an ext4 without a journal) the suite ran 15% slower (5:17 against 4:36) and left
# every new file slower for minutes after, a `make bench` run next among them. TEST_TMP=DIR picks
# the folder; TEST_TMP= keeps the system's.
TEST_TMP ?= $(shell d=/dev/shm; [ -d $$d ] && [ -w $$d ] && [ "$$(stat -f -c %T $$d)" = tmpfs ] && \
	[ "$$(df -Pk $$d | awk 'NR==2 {print $$4}')" -gt 2000000 ] && echo $$d)
TEST_ENV = $(if $(TEST_TMP),TMPDIR=$(TEST_TMP))

test: $(STAMP) ## run the test suite (slow tests excluded)
	$(TEST_ENV) $(BIN)/python -m pytest -q -n auto --maxprocesses 4

test-slow: $(STAMP) ## run only the slow tests (soak, 20,000-file intake, long fault injection)
	$(TEST_ENV) $(BIN)/python -m pytest -q -m slow

lint: $(STAMP) ## ruff and mypy
	$(BIN)/ruff check coordinator tests bench
	$(BIN)/mypy

bench: $(STAMP) ## run the benchmarks and print the figures
	$(BIN)/python -m bench

soak: $(STAMP) ## an hour of steady drops into a live supervisor: memory, fds and children must stay flat
	$(BIN)/python -m bench.soak $(SOAK_ARGS)

clean: ## remove the virtualenv and caches
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis
