# ledgerflow tasks. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SRC    := src tests bench examples

.PHONY: demo test lint types pytest bench format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.base: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e .
	touch $@

$(VENV)/.dev: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(VENV)/.base

demo: $(VENV)/.base  ## the order example on embedded SQLite (ledgerflow.db)
	$(BIN)/python examples/orders/demo.py sqlite:///ledgerflow.db
	$(BIN)/ledgerflow audit verify --db sqlite:///ledgerflow.db

test: $(VENV)/.dev lint types pytest  ## lint, types and the whole suite

lint: $(VENV)/.dev
	$(BIN)/ruff check $(SRC)
	$(BIN)/ruff format --check $(SRC)

types: $(VENV)/.dev
	$(BIN)/mypy

pytest: $(VENV)/.dev
	$(BIN)/pytest -q

bench: $(VENV)/.dev  ## every benchmark, one JSON line each
	@for b in bench/*.py; do $(BIN)/python $$b || exit 1; done

format: $(VENV)/.dev
	$(BIN)/ruff format $(SRC)
	$(BIN)/ruff check --fix $(SRC)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache ledgerflow.db ledgerflow.db-*
