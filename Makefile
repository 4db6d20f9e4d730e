# layercard: the few fixed entry points. `make setup` is idempotent and quick when nothing changed.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.setup-stamp
PROTO_SRC := $(wildcard proto/layercard/v1/*.proto proto/layercard/internal/v1/*.proto)
GEN_DIR := client

.PHONY: setup proto proto-check proto-lint proto-breaking obs-check k8s-check run demo test test-unit test-integration test-e2e bench lint format clean

setup: $(STAMP)

$(STAMP): requirements-dev.txt requirements-models.txt constraints.txt client/pyproject.toml service/pyproject.toml scripts/setup.sh
	bash scripts/setup.sh $(PY) $(VENV)
	touch $(STAMP)

proto: $(STAMP)
	bash scripts/gen_proto.sh $(BIN)/python $(GEN_DIR)

# Regenerates the stubs into a scratch folder and fails when they differ from the committed ones.
proto-check: $(STAMP) proto-lint proto-breaking
	@tmp=$$(mktemp -d) && bash scripts/gen_proto.sh $(BIN)/python $$tmp >/dev/null && \
	  diff -r -x __pycache__ $$tmp/layercard $(GEN_DIR)/layercard && echo "generated stubs are up to date" || \
	  { echo "generated stubs drifted from proto/: run 'make proto' and commit"; exit 1; }

proto-lint: $(STAMP)
	$(BIN)/buf lint
	$(BIN)/buf format --diff --exit-code proto

# Guards the contract against the last released version (proto/releases/, written by scripts/release_contract.sh).
proto-breaking: $(STAMP)
	$(BIN)/buf breaking --against $$(ls proto/releases/*.binpb | sort -V | tail -n 1)

# promtool checks of deploy/prometheus, rule unit tests, dashboard/rules reference only real series.
obs-check: $(STAMP)
	bash scripts/check_observability.sh $(BIN)/python

# Renders every kustomize overlay, validates it against the Kubernetes API schemas, lints deploy/ YAML and the Dockerfile.
k8s-check: $(STAMP)
	bash scripts/check_k8s.sh $(BIN)

# MODEL picks what vLLM serves and the demo tunes: a built-in (builtin:tiny, the default; builtin:smollm2-135m) or
# a local Hugging Face model directory. ARGS passes flags through, e.g. `make run MODEL=builtin:smollm2-135m
# ARGS=--no-demo`.
run: $(STAMP)
	$(BIN)/python -m layercard_service.launch $(if $(MODEL),--model '$(MODEL)') $(ARGS)

# The whole pipeline once more against a running `make run` (card, plan, tuning job, deploy, generate); give the
# same MODEL (and DATASET, to choose the task).
demo: $(STAMP)
	$(BIN)/layercard --address 127.0.0.1:50051 demo $(if $(MODEL),--model '$(MODEL)') $(if $(DATASET),--dataset '$(DATASET)') $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest tests

# Unit and integration tests never start vLLM: every e2e test is marked (tests/e2e/conftest.py), and a test
# outside tests/e2e that asks for a vLLM fixture fails (tests/conftest.py).
test-unit: $(STAMP)
	$(BIN)/python -m pytest -m "not e2e" tests/unit

test-integration: $(STAMP)
	$(BIN)/python -m pytest -m "not e2e" tests/integration

test-e2e: $(STAMP)
	$(BIN)/python -m pytest -m e2e tests/e2e

bench: $(STAMP)
	$(BIN)/python -m bench $(BENCH)

# ruff, and the import contracts of pyproject.toml (layers, no torch in the edge and control plane, sqlite3 only
# in persistence, api imported by the server alone).
lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .
	$(BIN)/buf format -w proto

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
