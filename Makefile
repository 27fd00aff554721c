# The two commands a newcomer needs: `make up` (the whole embedded plane with the example
# models) and `make test` (the test suite). Both create the virtualenv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: up test bench quick-bench lint clean

$(BIN)/modelplane: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,bench]'
	@touch $@

up: $(BIN)/modelplane
	$(BIN)/modelplane up

test: $(BIN)/modelplane
	$(BIN)/pytest -q

bench: $(BIN)/modelplane
	$(BIN)/modelplane bench

quick-bench: $(BIN)/modelplane
	$(BIN)/modelplane bench --quick

lint: $(BIN)/modelplane
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .modelplane .pytest_cache artifacts
