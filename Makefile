# Two commands on a fresh machine: `make run` (the main job end to end) and `make test`.
PYTHON ?= python3.11
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.canopy-installed

.PHONY: install run test lint bench clean-stack

# torch is installed first and pinned: 2.13.0 is a CPU wheel; a looser spec pulls CUDA builds.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "need $(PYTHON)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check .

test: install
	$(BIN)/ruff check . && $(BIN)/pytest -q

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
