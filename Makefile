# Set-up and entry points. `make demo` and `make test` are the README's two commands:
# each creates the venv, installs the project and builds rustbpe on a fresh machine first.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build lies on this machine's disk; elsewhere override, e.g. TORCH_SPEC='torch>=2.4'.
TORCH_SPEC ?= torch==2.13.0
PRESET ?= cpu-demo

.PHONY: setup demo test test-slow test-k8s-e2e lint bench clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml scripts/setup.sh scripts/build_rustbpe.sh $(wildcard rustbpe/Cargo.toml rustbpe/src/*.rs)
	PYTHON=$(PYTHON) VENV=$(VENV) TORCH_SPEC='$(TORCH_SPEC)' bash scripts/setup.sh
	touch $@

demo: setup
	$(BIN)/curtail-llm up --preset $(PRESET)

test: setup
	$(BIN)/ruff check .
	$(BIN)/pytest -q -ra --durations=30

# The slower tier (pytest marker tier2: the README's by-hand terminals, ctrl-c of a launched
# stack, the torchrun baseline's resume): ~7 min, so not part of `make test`
test-slow: setup
	$(BIN)/pytest -q -ra -m tier2

# Kubernetes end to end (two API servers, the process kubelet, real SuperNodes; needs root
# and ../shared/k8s): ~6 min, so not part of `make test`
test-k8s-e2e: setup
	$(BIN)/pytest -q -ra -m k8s_e2e tests/k8s/test_e2e.py

lint: setup
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: setup
	for b in bench/*.py; do echo "== $$b"; $(BIN)/python $$b || exit 1; done

clean:
	rm -rf $(VENV) rustbpe/target .pytest_cache .ruff_cache
