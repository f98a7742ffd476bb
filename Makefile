# kiln: `make run` materializes the pipeline, `make test` runs the tests. Each sets up .venv first.
# pip's wheel cache is left on: llama-cpp-python compiles from source once and later installs reuse
# the cached wheel. kiln calls llama.cpp's model, sampling and quantizer functions only, so the
# compile leaves out llama-cpp-python's multimodal library (LLAVA_BUILD=OFF: about a third of the
# objects). llama-server (only that target, from the same llama.cpp sources, once per machine, cached
# in ~/.cache/kiln/llama-server-<version>/) is built by the targets that serve: `make server`,
# `make test`, `make serve`, `make bench-serve`; `make run` does not wait for it.

PYTHON ?= python3
VENV := .venv
LOCK := requirements.lock
PIP_VERSION := 26.3
UV_VERSION := 0.13.8
BIN := $(VENV)/bin
STAMP := $(VENV)/.kiln-installed
PROFILE ?= tiny
FORCE ?=
LLAMA_CMAKE_ARGS ?= -DLLAVA_BUILD=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF
# the embedded default; a shell with the `make services` environment keeps its own
DAGSTER_HOME ?= $(CURDIR)/.dagster_home
export DAGSTER_HOME
export HF_HUB_OFFLINE := 1
export HF_DATASETS_OFFLINE := 1

.PHONY: run test install lock pre-commit test-fast server server-required sandbox postgres prometheus browser services services-down services-status ui mlflow-ui bench \
	bench-serve serve clean-work

install: sandbox $(STAMP) server

# HumanEval scoring runs completions in bubblewrap (Debian's package): installed when missing and
# this is root, else the command to install it is printed (scoring refuses to run without it).
sandbox:
	@command -v bwrap >/dev/null || { [ "$$(id -u)" = 0 ] && \
		{ apt-get install -y bubblewrap || { apt-get update && apt-get install -y bubblewrap; }; }; } \
		|| echo "bubblewrap is missing: sudo apt-get install bubblewrap (HumanEval scoring needs it)"

# The production deployment on one machine (`make services`) runs Debian's PostgreSQL: installed when
# missing and this is root, as bubblewrap is. `make test` needs it: a failed install stops it here, with
# apt's own error, rather than turning the services tests into skips.
postgres:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && \
		{ apt-get install -y postgresql || { apt-get update && apt-get install -y postgresql; }; }; } \
		|| { echo "postgresql is missing: sudo apt-get install postgresql (make services and its tests need it)"; exit 1; }

# Prometheus (Debian's package) for `make services`, and its `promtool`, which the tests run on the alert
# rules (deploy/prometheus/): installed the same way.
prometheus:
	@command -v promtool >/dev/null || { [ "$$(id -u)" = 0 ] && \
		{ apt-get install -y --no-install-recommends prometheus || \
		{ apt-get update && apt-get install -y --no-install-recommends prometheus; }; }; } \
		|| { echo "prometheus is missing: sudo apt-get install prometheus (make services and the alert-rule tests need it)"; exit 1; }

# Debian's chromium, for screenshots of the UIs (docs/) and browser tests driven by its executable path:
# installed when missing and this is root, as bubblewrap is (`make browser`; the browser tests install it themselves).
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && \
		{ apt-get install -y chromium || { apt-get update && apt-get install -y chromium; }; }; } \
		|| echo "chromium is missing: sudo apt-get install chromium"

# Installs exactly requirements.lock (every package pinned, with its hashes), then kiln itself without
# dependencies; `make lock` re-resolves pyproject.toml's ranges into it.
$(STAMP): pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet pip==$(PIP_VERSION)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS) $$CMAKE_ARGS" $(BIN)/python -m pip install --require-hashes -r $(LOCK)
	$(BIN)/python -m pip install --quiet --no-deps -e .
	touch $(STAMP)

# The newest versions pyproject.toml allows (with the test extra), pinned with hashes, from the indexes
# pip is configured with (pip.conf, PIP_* variables: uv does not read them, so they are handed over).
lock:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet uv==$(UV_VERSION)
	$(BIN)/uv pip compile pyproject.toml --extra test --generate-hashes --python-version 3.11 \
		--python-platform x86_64-manylinux_2_28 --index-strategy unsafe-best-match --no-header --quiet \
		$$(for u in $$($(BIN)/pip config get global.extra-index-url 2>/dev/null); do echo --extra-index-url $$u; done) \
		$$(for u in $${PIP_FIND_LINKS:-$$($(BIN)/pip config get global.find-links 2>/dev/null)}; do echo --find-links $$u; done) \
		-o $(LOCK)

server: $(STAMP)
	$(BIN)/python -m pipeline.serve.engine || echo "llama-server was not built: kiln serve and its tests will say why"

# `make test` needs llama-server: a failed build stops it here, after the compiler's own error.
server-required: $(STAMP)
	$(BIN)/python -m pipeline.serve.engine

# FORCE=1: compute every stage again and register a new version even when nothing changed.
run: sandbox $(STAMP)
	time $(BIN)/kiln run --profile $(PROFILE) $(if $(FORCE),--force)

# KILN_REQUIRE_SERVICES: a test that finds llama-server, PostgreSQL or promtool missing fails instead of skipping
test: sandbox postgres prometheus $(STAMP) server-required
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	KILN_REQUIRE_SERVICES=1 $(BIN)/python -m pytest

# the tests not marked slow: a quick loop while working (make test runs them all, as CI does)
test-fast: $(STAMP)
	$(BIN)/python -m pytest -m "not slow"

# ruff (lint and format), the layer test and mypy before each commit, as `make test` checks them
pre-commit: $(STAMP)
	$(BIN)/pre-commit install

ui: $(STAMP)
	$(BIN)/dagster dev -w workspace.yaml -h 127.0.0.1 -p 3000

mlflow-ui: $(STAMP)
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(CURDIR)/registry/mlflow.db --host 127.0.0.1 --port 5000

bench: $(STAMP)
	$(BIN)/python benchmarks/clean_throughput.py
	$(BIN)/python benchmarks/pii_accuracy.py
	$(BIN)/python benchmarks/pretrain_throughput.py
	$(BIN)/python benchmarks/humaneval_generation.py
	$(BIN)/python benchmarks/sandbox_overhead.py

serve: server
	$(BIN)/python -m pipeline.serve.engine
	$(BIN)/kiln serve --profile $(PROFILE)

bench-serve: $(STAMP)
	$(BIN)/python -m pipeline.serve.engine
	$(BIN)/python benchmarks/serve_load.py

# PostgreSQL, an MLflow tracking server on it, the Dagster daemon and UI on the same database and Prometheus
# scraping kiln serve, in .services/; prints the environment that points kiln at them (also in .services/env.sh).
services: postgres prometheus $(STAMP)
	$(BIN)/python -m pipeline.deploy.services up

services-down:
	$(BIN)/python -m pipeline.deploy.services down

services-status:
	$(BIN)/python -m pipeline.deploy.services status

clean-work:
	rm -rf data/work
