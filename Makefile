# Nocturne developer entry points. The two that matter:
#   make demo   - bring up a local control plane (and, in later issues, the operator and a schedule)
#   make test   - install everything needed on a fresh machine and run every test layer
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
DEMO_DIR := .nocturne/cluster
# The repository root must never be on sys.path: `operator/` would shadow the stdlib module.
# tests/ holds the packages `harness` (control plane, real node, images, PostgreSQL; see
# tests/harness/README.md), `unit`, `integration` and `e2e` (the product's tests).
export PYTHONSAFEPATH := 1
export PYTHONPATH := $(CURDIR)/tests
export PYTHONDONTWRITEBYTECODE := 1

PY_SOURCES := $(shell find operator agent_runner -name '*.py' 2>/dev/null)

.PHONY: help setup system-deps lint typecheck test pytest-all test-fast cluster-build demo demo-down clean

help:
	@echo "make demo       local control plane + real node + operator, example schedules, one run"
	@echo "make demo-down  stop it"
	@echo "make test       set up and run all tests (lint, types, unit, integration, e2e, fault drills)"
	@echo "make test-fast  unit + integration tests only"

system-deps:
	@bash .ci/install-system-deps

# Editable install in strict mode: a link tree maps operator/ to the import name nocturne_operator
# (mypy and the runtime both see it); re-run whenever a module is added.
$(VENV)/.installed: pyproject.toml $(PY_SOURCES)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -m pip install -q --disable-pip-version-check --upgrade 'pip>=25.1'
	@echo "[setup] installing nocturne and its dev tools into $(VENV)"
	@$(PY) -m pip install -q --disable-pip-version-check -e . \
		--config-settings editable_mode=strict --group dev
	@touch $@

setup: system-deps $(VENV)/.installed

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

typecheck: setup
	$(VENV)/bin/mypy -p nocturne_operator -p agent_runner
	$(VENV)/bin/mypy tests bench

cluster-build: setup
	@if command -v go >/dev/null; then $(PY) -m harness.build && $(PY) -m harness.gotools \
		&& $(PY) -m harness.images; \
	else echo "[kube-local] Go not installed: e2e tests will skip (and fail under CI=true)"; fi

# Each stage prints how long it took (CI's budget is 90 min): `[time] <stage>: N s`.
TIMED = t=$$(date +%s); $(MAKE) --no-print-directory $(1); rc=$$?; \
	echo "[time] $(1): $$(( $$(date +%s) - t )) s"; exit $$rc

test: setup
	@$(call TIMED,lint)
	@$(call TIMED,typecheck)
	@$(call TIMED,cluster-build)
	@$(call TIMED,pytest-all)

pytest-all:
	$(VENV)/bin/pytest --durations=15

test-fast: setup
	$(VENV)/bin/pytest -m "not e2e"

demo: setup
	@$(PY) -m e2e.demo up --dir $(DEMO_DIR)

demo-down:
	@test -x $(PY) && $(PY) -m e2e.demo down --dir $(DEMO_DIR) || true

clean: demo-down
	rm -rf $(VENV) build *.egg-info .mypy_cache .ruff_cache .pytest_cache .nocturne

# --- kind (needs Docker; not available on our CI machines, used by .github/workflows/kind-e2e.yml) ---
KIND_CLUSTER ?= nocturne
KIND_NS ?= nocturne-system
KIND_DEMO_NS ?= chart-demo
KIND_PG_PASSWORD ?= kind-demo
KIND_KUBECONFIG := .nocturne/kind.kubeconfig

.PHONY: kind-up kind-load kind-install kind-e2e

kind-up:
	kind create cluster --config kind-config.yaml
	@mkdir -p .nocturne && kind get kubeconfig --name $(KIND_CLUSTER) > $(KIND_KUBECONFIG)

kind-load:
	docker build -f operator/Dockerfile -t nocturne-operator:e2e .
	docker build -f agent_runner/Dockerfile -t nocturne-runner:e2e .
	kind load docker-image nocturne-operator:e2e nocturne-runner:e2e --name $(KIND_CLUSTER)

kind-install: setup
	@export PATH="$$($(PY) -m harness.tools):$$PATH" KUBECONFIG=$(KIND_KUBECONFIG); \
	kubectl create namespace $(KIND_DEMO_NS) --dry-run=client -o yaml | kubectl apply -f - && \
	helm upgrade --install nocturne helm/nocturne -n $(KIND_NS) --create-namespace --wait --timeout 6m \
	  --set operator.image.repository=nocturne-operator --set operator.image.tag=e2e \
	  --set runner.image.repository=nocturne-runner --set runner.image.tag=e2e \
	  --set postgresql.enabled=true --set postgresql.auth.password=$(KIND_PG_PASSWORD) \
	  --set 'operator.watchNamespaces={$(KIND_DEMO_NS)}' --set runner.databaseSecret.create=true

kind-e2e: setup
	NOCTURNE_E2E_KUBECONFIG=$(KIND_KUBECONFIG) \
	NOCTURNE_E2E_IN_CLUSTER_DATABASE_URL=postgresql+psycopg://nocturne:$(KIND_PG_PASSWORD)@nocturne-postgresql.$(KIND_NS).svc:5432/nocturne \
	$(VENV)/bin/pytest -m e2e
