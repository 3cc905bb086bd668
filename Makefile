# Kluis: the two set-up commands are `make serve` and `make test` (see README.md).
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
DATA   ?= ./data
HOST   ?= 127.0.0.1
PORT   ?= 8448

.PHONY: lock install serve test lint typecheck pytest fuzz audit-deps clean bench bench-quick bench-compare bench-plots bench-groups

# The whole toolchain (tests, lint, types). A stamp of its own: `make serve` may have made the
# venv with the server's packages only, and its `kluis` says nothing about the rest.
$(VENV)/.dev: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c requirements.lock -e '.[dev]'
	@touch $@

install: $(VENV)/.dev

# Only what the server needs (no test toolchain): the first `make serve` on a fresh machine.
$(VENV)/.server: pyproject.toml requirements.lock
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q -c requirements.lock -e .
	@touch $@

# Run one node on embedded SQLite in $(DATA); on the first run, print a first licence code.
serve: $(VENV)/.server
	@if [ ! -f $(DATA)/kluis.sqlite3 ]; then \
	  echo "First licence code (redeem with: kluis register --server http://$(HOST):$(PORT) --licence CODE --profile DIR):"; \
	  $(BIN)/kluis licence create --data $(DATA) --init --count 1; \
	else \
	  echo "More licence codes: $(BIN)/kluis licence create --data $(DATA) [--count N]"; \
	fi
	$(BIN)/kluis serve --data $(DATA) --host $(HOST) --port $(PORT)

lint: install
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

# Strict mypy on src/kluis, tests and bench (the list is in pyproject.toml).
typecheck: install
	$(BIN)/mypy

# One worker per core: most tests wait on servers, subprocesses and timers, not on the CPU.
pytest: install
	$(BIN)/pytest -q -n auto

# Known vulnerabilities in the installed dependencies (pip-audit); says SKIP when offline.
audit-deps: install
	$(BIN)/python .ci/audit_deps.py

# The whole suite: lint, types, tests, dependency audit.
test: lint typecheck pytest audit-deps

# Benchmarks (BENCHMARKS.md): loopback only, bounded in count and time, JSON in bench/results/.
BENCH_PEER ?= ../shared/bench-peer
export BENCH_PEER_DIR ?= $(or $(TMPDIR),/tmp)/kluis-bench-peer

$(VENV)/.bench-installed: pyproject.toml requirements.lock $(VENV)/.dev
	$(BIN)/pip install -q -c requirements.lock -e '.[dev,bench]'
	@touch $@

# Rewrite the lock from a fresh install of every extra (after changing pyproject's dependencies).
lock:
	rm -rf .venv-lock && $(PYTHON) -m venv .venv-lock && .venv-lock/bin/pip install -q -e '.[dev,bench]'
	(echo "# Exact versions every install uses as constraints (make lock rewrites it); pip-audit"; \
	 echo "# audits what this set installs."; \
	 .venv-lock/bin/pip freeze --exclude-editable | grep -v '^kluis') > requirements.lock
	rm -rf .venv-lock

# All four workloads (pairs, paced, burst, idle at 5,000/10,000/19,000), pairs and paced again
# with real end-to-end encryption, then the plots.
bench: $(VENV)/.bench-installed
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.run --crypto --only pairs,paced
	$(BIN)/python -m bench.plots

# Small sizes, under two minutes.
bench-quick: $(VENV)/.bench-installed
	$(BIN)/python -m bench.run --quick --out bench/results/quick
	$(BIN)/python -m bench.run --quick --crypto --only pairs,paced --out bench/results/quick

# Kluis and Matrix Synapse (../shared/bench-peer) on this machine in one run, side by side.
bench-compare: $(VENV)/.bench-installed
	$(BIN)/python -m bench.run
	$(BIN)/python -m bench.run --crypto --only pairs,paced
	$(BIN)/python -m bench.compare --peer $(BENCH_PEER)
	$(BIN)/python -m bench.plots

# Group fan-out (issue 9): one sender, 250 and 1,000 members online, opaque bodies back to back
# and paced at 2/s; then 250 members with real encryption at 1/s (bench/groups.py).
bench-groups: $(VENV)/.bench-installed
	$(BIN)/python -m bench.run --only groups --groups 250,1000 --group-messages 100 --group-rate 2
	$(BIN)/python -m bench.run --crypto --only groups --groups 250 --group-messages 20 --group-rate 1

bench-plots: $(VENV)/.bench-installed
	$(BIN)/python -m bench.plots

# A longer run of the Hypothesis properties over every decoder (the suite runs 60 examples each).
FUZZ_EXAMPLES ?= 5000
fuzz: install
	KLUIS_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(BIN)/pytest -q tests/test_fuzz.py

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .mypy_cache .ruff_cache
