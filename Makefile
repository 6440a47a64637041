# ledgerflow tasks. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
SRC    := src tests bench examples
PORT   ?= 8000

.PHONY: demo test lint types pytest bench format clean mutants openapi

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

$(VENV)/.base: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[server]'
	touch $@

$(VENV)/.dev: $(BIN)/python pyproject.toml
	$(BIN)/pip install -q -e '.[dev]'
	touch $@ $(VENV)/.base

DEMO_DB  := sqlite:///ledgerflow.db
DEMO_KEY := ledgerflow-keys/ledger-signing

demo: $(VENV)/.base  ## the order example on embedded SQLite (ledgerflow.db)
	@test -f ledgerflow.db || rm -f ledgerflow-heads.jsonl  # a new ledger, a new witness
	$(BIN)/python examples/orders/demo.py $(DEMO_DB)
	@test -f $(DEMO_KEY).key || $(BIN)/ledgerflow audit keygen ledgerflow-keys
	$(BIN)/ledgerflow audit checkpoint --db $(DEMO_DB) --key $(DEMO_KEY).key \
		--witness ledgerflow-heads.jsonl
	$(BIN)/ledgerflow audit verify --db $(DEMO_DB) --witness ledgerflow-heads.jsonl \
		--public-key $(DEMO_KEY).pub
	$(BIN)/python examples/orders/serve.py sqlite:///ledgerflow.db --port $(PORT)

test: $(VENV)/.dev lint types pytest  ## lint, types and the whole suite

lint: $(VENV)/.dev
	$(BIN)/ruff check $(SRC)
	$(BIN)/ruff format --check $(SRC)

types: $(VENV)/.dev
	$(BIN)/mypy

pytest: $(VENV)/.dev
	$(BIN)/pytest -q

openapi: $(VENV)/.dev  ## regenerate docs/openapi.json from the server's routes
	$(BIN)/python -m ledgerflow.server.openapi > docs/openapi.json

bench: $(VENV)/.dev  ## every benchmark, one JSON line each
	@for b in bench/[!_]*.py; do $(BIN)/python $$b || exit 1; done

# Mutation testing ([tool.mutmut] in pyproject.toml): mutmut over each core file with
# the tests that are about it, in a copy of the tree under $(MUTANTS_DIR)/<file>. Slow,
# so neither in `test` nor in CI; see docs/mutation-testing.md. `make mutants-audit`
# runs one file; MUTANT_GLOB='*[05]' a sample (mutants whose number ends in 0 or 5).
MUTANTS_DIR  ?= build/mutmut
MUTANT_FILES ?= plan audit run engine
MUTANT_GLOB  ?= *
MUTANT_MODULE_plan   := ledgerflow.store._plan
MUTANT_MODULE_audit  := ledgerflow.audit
MUTANT_MODULE_run    := ledgerflow.workflow.run
MUTANT_MODULE_engine := ledgerflow.workflow.engine
MUTANT_TESTS_plan    := tests/test_plan.py tests/test_store_contract.py \
	tests/test_store_stateful.py tests/test_store_faults.py tests/test_sqlite.py \
	tests/test_bad_input.py tests/test_audit.py
MUTANT_TESTS_audit   := tests/test_audit.py
MUTANT_TESTS_run     := tests/test_workflows.py tests/test_engine_promises.py \
	tests/test_golden_replay.py tests/test_history.py tests/test_testing.py \
	tests/test_cli_workflows.py tests/test_runtime_rows.py tests/test_read_only.py \
	tests/test_run_edges.py tests/test_engine_runtime.py
MUTANT_TESTS_engine  := $(MUTANT_TESTS_run)

mutants: $(addprefix mutants-,$(MUTANT_FILES))  ## mutation testing; kill rate per file
	@printf '%-28s %6s %6s %8s %7s %10s %5s %6s\n' module killed total survived timeout \
		suspicious other rate
	@for f in $(MUTANT_FILES); do cat $(MUTANTS_DIR)/$$f/rate.txt; done

# SIGHUP is ignored: one mutant of engine.owner_is_gone, os.kill(pid, 1) for
# os.kill(pid, 0), signals the test's parent process, which is mutmut itself.
mutants-%: $(VENV)/.dev
	rm -rf $(MUTANTS_DIR)/$*
	mkdir -p $(MUTANTS_DIR)/$*
	cp -R src tests examples pyproject.toml $(MUTANTS_DIR)/$*/
	cd $(MUTANTS_DIR)/$* && trap '' HUP && PYTEST_ADDOPTS="-o 'testpaths=$(MUTANT_TESTS_$*)'" \
		$(abspath $(BIN))/mutmut run '$(MUTANT_MODULE_$*).$(MUTANT_GLOB)'
	cd $(MUTANTS_DIR)/$* && $(abspath $(BIN))/mutmut results --all true \
		| grep -F ' $(MUTANT_MODULE_$*).' | grep -v ': not checked$$' | awk -F': ' \
		'{ n++; s[$$2]++ } END { k = s["killed"]; o = n - k - s["survived"] \
		- s["timeout"] - s["suspicious"]; printf "%-28s %6d %6d %8d %7d %10d %5d %5.1f%%\n", \
		"$(MUTANT_MODULE_$*)", k, n, s["survived"], s["timeout"], s["suspicious"], o, \
		n ? 100 * k / n : 0 }' > rate.txt
	@cat $(MUTANTS_DIR)/$*/rate.txt

format: $(VENV)/.dev
	$(BIN)/ruff format $(SRC)
	$(BIN)/ruff check --fix $(SRC)

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache ledgerflow.db ledgerflow.db-*
