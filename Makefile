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

# The kserve Python client, for tests/test_oip_clients.py, in a virtualenv of its own: kserve pins
# cloudevents below 2, and the project needs 2.
KSERVE_VENV ?= .venv-kserve
$(KSERVE_VENV)/.installed:
	$(PYTHON) -m venv $(KSERVE_VENV)
	$(KSERVE_VENV)/bin/pip install --quiet --upgrade pip
	$(KSERVE_VENV)/bin/pip install --quiet 'kserve>=0.14,<1'
	@touch $@

test: $(BIN)/modelplane $(KSERVE_VENV)/.installed
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
	rm -rf $(VENV) $(KSERVE_VENV) .modelplane .pytest_cache artifacts
