# The two commands a newcomer needs: `make up` (the whole embedded plane with the example
# models) and `make test` (the test suite). Both create the virtualenv on first use.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: up test test-knative bench quick-bench lint clean

$(BIN)/modelplane: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[test,bench]'
	@touch $@

up: $(BIN)/modelplane
	$(BIN)/modelplane up

test: $(BIN)/modelplane
	$(BIN)/pytest -q

# The real-Knative tier alone: builds (once, cached) Kubernetes, Knative and the ingress from their
# Go modules, then runs the tests that install them on a one-node cluster (root, podman, containerd).
test-knative: $(BIN)/modelplane
	scripts/cluster-build.sh >/dev/null
	$(BIN)/pytest -q -m knative

bench: $(BIN)/modelplane
	$(BIN)/modelplane bench

quick-bench: $(BIN)/modelplane
	$(BIN)/modelplane bench --quick

lint: $(BIN)/modelplane
	$(BIN)/lint-imports

clean:
	rm -rf $(VENV) .modelplane .pytest_cache artifacts
