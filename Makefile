# MES backend — developer entry points. `make help` lists them.

SHELL := bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := help

CARGO    ?= cargo
SERVICES := scan-ingest trace-query erp-sync gateway

# Container images: $(IMAGE_PREFIX)<service>:$(IMAGE_TAG)
IMAGE_PREFIX ?= mes/
IMAGE_TAG    ?= dev

# Kubernetes manifests: overlays to render and the API versions to validate them against
K8S_OVERLAYS      := $(notdir $(wildcard k8s/overlays/*))
K8S_VERSIONS      ?= 1.30.0 1.37.0
K8S_VENV          := var/venv-k8s
K8S_VALIDATE      := $(K8S_VENV)/bin/kubernetes-validate
K8S_VALIDATE_PKG  ?= kubernetes-validate==1.37.0

.PHONY: help run test test-faults reliability-report failpoint-bins build lint fmt bench bench-quick docker k8s alerts compose-check clean deps-up deps-down

help: ## list the targets
	@grep -hE '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sort | \
		awk 'BEGIN {FS = ":.*## "}; {printf "  make %-10s %s\n", $$1, $$2}'

run: ## build and run all four services on the demo plant (Ctrl-C stops everything)
	scripts/run.sh

test: deps-up ## deps up, rustfmt check, clippy -D warnings, then the whole test suite
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	scripts/promtool-test.sh
	scripts/compose-check.sh
	scripts/k8s-copies.sh
	python3 scripts/check-doc-links.py
	@# the end-to-end suite (tests/) starts the four service binaries: build them first
	$(MAKE) --no-print-directory failpoint-bins
	$(CARGO) build --workspace --bins
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		echo "$(CARGO) nextest run --workspace"; \
		$(CARGO) nextest run --workspace; \
	else \
		echo "cargo-nextest not found; using cargo test"; \
		$(CARGO) test --workspace; \
	fi

test-faults: deps-up ## the fault suite alone: the binaries under a tablet load while processes are killed and PostgreSQL, Redis and the network fail
	$(MAKE) --no-print-directory failpoint-bins
	$(CARGO) build --workspace --bins
	@if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run -p mes-e2e --test under_fire --no-capture; \
	else \
		$(CARGO) test -p mes-e2e --test under_fire -- --nocapture --test-threads 1; \
	fi

reliability-report: deps-up ## the fault suite and the REST/gRPC fuzzers, then target/reliability/report.md (and .json)
	rm -rf "$(or $(CARGO_TARGET_DIR),target)/reliability"
	$(MAKE) --no-print-directory failpoint-bins
	$(CARGO) build --workspace --bins
	@status=0; \
	if $(CARGO) nextest --version >/dev/null 2>&1; then \
		$(CARGO) nextest run -p mes-e2e --no-fail-fast \
			-E 'binary(under_fire) | binary(grpc_fuzz) | test(the_rest_api_survives_schema_driven_fuzzing)' || status=$$?; \
	else \
		$(CARGO) test -p mes-e2e --test under_fire --test grpc_fuzz -- --test-threads 1 || status=$$?; \
		$(CARGO) test -p mes-e2e --test e2e the_rest_api_survives_schema_driven_fuzzing || status=$$?; \
	fi; \
	python3 scripts/reliability-report.py "$(or $(CARGO_TARGET_DIR),target)" || status=$$?; \
	exit $$status

# The fault suite's crash points: scan-ingest and erp-sync built with their `failpoints` feature,
# copied to target/debug/failpoints/ (the next workspace build puts the plain binaries back in
# target/debug/; both builds stay cached, so switching costs a copy). No other build enables it.
FAILPOINT_DIR := $(or $(CARGO_TARGET_DIR),target)/debug/failpoints
failpoint-bins: ## scan-ingest and erp-sync with their fail points, for the fault suite (target/debug/failpoints/)
	$(CARGO) build -p scan-ingest -p erp-sync --bins --features scan-ingest/failpoints,erp-sync/failpoints
	mkdir -p "$(FAILPOINT_DIR)"
	cp "$(or $(CARGO_TARGET_DIR),target)/debug/scan-ingest" "$(or $(CARGO_TARGET_DIR),target)/debug/erp-sync" "$(FAILPOINT_DIR)/"

build: ## build every binary (debug)
	$(CARGO) build --workspace --bins

lint: ## rustfmt check and clippy with warnings as errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

fmt: ## format the code
	$(CARGO) fmt --all

bench: ## release build, then the stack against pgbench and redis-benchmark in one run (scripts/bench.sh; ~5 min)
	scripts/bench.sh

bench-quick: ## the same table with 3 s runs and a smaller generated plant (under 3 min after the build)
	scripts/bench.sh --quick

docker: ## build one image per service from deploy/Dockerfile (needs a running Docker engine)
	@docker info >/dev/null 2>&1 || { echo "docker: no Docker engine is reachable (docker info failed)" >&2; exit 1; }
	@for s in $(SERVICES); do \
		echo "docker build --build-arg SERVICE=$$s -t $(IMAGE_PREFIX)$$s:$(IMAGE_TAG)"; \
		DOCKER_BUILDKIT=1 docker build -f deploy/Dockerfile --build-arg SERVICE=$$s \
			-t $(IMAGE_PREFIX)$$s:$(IMAGE_TAG) . ; \
	done

$(K8S_VALIDATE):
	@echo "installing $(K8S_VALIDATE_PKG) into $(K8S_VENV)"
	python3 -m venv $(K8S_VENV)
	$(K8S_VENV)/bin/pip install --quiet --disable-pip-version-check $(K8S_VALIDATE_PKG)

# kubernetes-validate knows the built-in kinds only (it passes any other with a warning, hidden
# here by --no-warn):
# scripts/k8s-validate-crs.py validates the custom resources (ServiceMonitor, PrometheusRule)
# against the CRD schemas in k8s/components/*/schemas and fails on a kind no schema covers.
k8s: $(K8S_VALIDATE) ## render every k8s overlay with kustomize and validate it against the Kubernetes schemas
	@command -v kubectl >/dev/null || { echo "k8s: kubectl is needed (kubectl kustomize)" >&2; exit 1; }
	scripts/k8s-copies.sh
	@mkdir -p var/k8s
	@for o in $(K8S_OVERLAYS); do \
		echo "kubectl kustomize k8s/overlays/$$o > var/k8s/$$o.yaml"; \
		kubectl kustomize k8s/overlays/$$o > var/k8s/$$o.yaml; \
		for v in $(K8S_VERSIONS); do \
			echo "kubernetes-validate --strict --quiet --no-warn -k $$v var/k8s/$$o.yaml"; \
			$(K8S_VALIDATE) --strict --quiet --no-warn -k $$v var/k8s/$$o.yaml; \
		done; \
		echo "k8s-validate-crs.py $(addprefix -k ,$(K8S_VERSIONS)) var/k8s/$$o.yaml"; \
		$(K8S_VENV)/bin/python scripts/k8s-validate-crs.py $(addprefix -k ,$(K8S_VERSIONS)) var/k8s/$$o.yaml; \
		echo "k8s/overlays/$$o: $$(grep -c '^kind:' var/k8s/$$o.yaml) resources valid"; \
	done

alerts: ## promtool: check the alert rules and the compose Prometheus config, run the rules' unit tests (deploy/prometheus/tests)
	scripts/promtool-test.sh

compose-check: ## validate deploy/docker-compose.yml against the Compose Specification without a Docker engine
	scripts/compose-check.sh

deps-up: ## make sure PostgreSQL and Redis answer (starts throwaway local ones if not)
	scripts/deps.sh up

deps-down: ## stop what deps-up started (never a server it did not start)
	scripts/deps.sh down

clean: ## stop started deps and delete var/ and cargo's target directory
	scripts/deps.sh down --purge
	rm -rf var
	$(CARGO) clean
