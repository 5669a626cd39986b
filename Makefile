# Two commands on a fresh machine: `make run` (the main job end to end) and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.canopy-installed
# Exact versions of every package (pip constraints); `make lock` refreshes it.
CONSTRAINTS := constraints.txt
LOCK_VENV ?= /tmp/canopy-lock-venv

.PHONY: install run test test-postgres lint typecheck lock bench clean-stack

# torch is installed first and pinned: 2.13.0 is a CPU wheel; a looser spec pulls CUDA builds.
# `local` is the laptop stack's S3 server (moto), needed by `make run` and the tests.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) torch==2.13.0
	$(BIN)/pip install --quiet -c $(CONSTRAINTS) -e ".[dev,local]"
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check .

typecheck: install
	$(BIN)/mypy aggregation infra

test: install
	$(BIN)/ruff check . && $(BIN)/mypy aggregation infra && $(BIN)/pytest -q --durations=10
	@$(MAKE) --no-print-directory test-postgres

# The end-to-end tests once more with Prefect's server on PostgreSQL, which the test
# session starts itself (infra/postgres.py, CANOPY_TEST_DATABASE in tests/conftest.py).
# Where PostgreSQL's server is not installed the pass is skipped, saying so; in CI
# (CI=true) it must run: .ci/run installs Debian's postgresql first.
POSTGRES_TESTS := tests/test_flow_e2e.py tests/test_postgres.py
test-postgres: install
	@if $(BIN)/python -m infra.postgres; then \
	  echo "== end-to-end tests again, Prefect on PostgreSQL (CANOPY_TEST_DATABASE=postgres) =="; \
	  CANOPY_TEST_DATABASE=postgres $(BIN)/pytest -q $(POSTGRES_TESTS); \
	elif [ "$${CI:-}" = true ]; then \
	  echo "CI=true and PostgreSQL cannot run: the PostgreSQL pass of make test must run in CI"; \
	  exit 1; \
	else \
	  echo "SKIPPED the PostgreSQL pass of make test (the end-to-end tests on Prefect on"; \
	  echo "PostgreSQL): install its server (apt-get install -y postgresql, as root) to run it"; \
	fi

# Re-resolve pyproject's ranges in a throwaway venv (no constraints) and pin the result.
# Run it after changing a dependency, then `make test` and commit constraints.txt.
lock:
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	rm -rf $(LOCK_VENV)
	$(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install --quiet --upgrade pip
	$(LOCK_VENV)/bin/pip install --quiet torch==2.13.0
	$(LOCK_VENV)/bin/pip install --quiet -e ".[dev,local]"
	{ sed -n '/^#/p' $(CONSTRAINTS); \
	  $(LOCK_VENV)/bin/pip freeze --exclude-editable | grep -v '^#' \
	    | sed -E 's/^(torch==[^+]*)\+.*/\1/'; } > $(CONSTRAINTS).new
	mv $(CONSTRAINTS).new $(CONSTRAINTS)
	rm -rf $(LOCK_VENV)

# The main job: local stack (Prefect on SQLite, moto S3, two gateways, a runner,
# simulated devices), then the cifar10-mobile deployment, watched to the end.
run: install
	$(BIN)/canopy demo --job cifar10-mobile

bench: install
	$(BIN)/python benchmarks/aggregate.py
	$(BIN)/python benchmarks/trainers.py
	$(BIN)/python benchmarks/gateway.py
	$(BIN)/python benchmarks/round_overhead.py

clean-stack:
	-$(BIN)/canopy down
