# kiln: `make run` materializes the pipeline, `make test` runs the tests. Each sets up .venv first.
# pip's wheel cache is left on: llama-cpp-python compiles from source once and later installs reuse
# the cached wheel. kiln calls llama.cpp's model, sampling and quantizer functions only, so the
# compile leaves out llama-cpp-python's multimodal library (LLAVA_BUILD=OFF: about a third of the
# objects). llama-server (only that target, from the same llama.cpp sources, once per machine, cached
# in ~/.cache/kiln/llama-server-<version>/) is built by the targets that serve: `make server`,
# `make test`, `make serve`, `make bench-serve`; `make run` does not wait for it.

PYTHON ?= python3
VENV := .venv
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

.PHONY: run test install server server-required sandbox postgres browser services services-down services-status ui mlflow-ui bench \
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

# The playground page's test drives Debian's chromium through Playwright (its executable path, no
# downloaded browser): installed when missing and this is root, as bubblewrap is; the test skips without it.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && \
		{ apt-get install -y chromium || { apt-get update && apt-get install -y chromium; }; }; } \
		|| echo "chromium is missing: sudo apt-get install chromium (the playground test needs it)"

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade --quiet pip
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS) $$CMAKE_ARGS" $(BIN)/python -m pip install -e '.[test]'
	touch $(STAMP)

server: $(STAMP)
	$(BIN)/python -m pipeline.serve.engine || echo "llama-server was not built: kiln serve and its tests will say why"

# `make test` needs llama-server: a failed build stops it here, after the compiler's own error.
server-required: $(STAMP)
	$(BIN)/python -m pipeline.serve.engine

# FORCE=1: compute every stage again and register a new version even when nothing changed.
run: sandbox $(STAMP)
	time $(BIN)/kiln run --profile $(PROFILE) $(if $(FORCE),--force)

# KILN_REQUIRE_SERVICES: a test that finds llama-server or PostgreSQL missing fails instead of skipping
test: sandbox postgres browser $(STAMP) server-required
	$(BIN)/ruff check .
	KILN_REQUIRE_SERVICES=1 $(BIN)/python -m pytest

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

# PostgreSQL, an MLflow tracking server on it and the Dagster daemon and UI on the same database, in
# .services/; prints the environment that points kiln at them (also in .services/env.sh).
services: postgres $(STAMP)
	$(BIN)/python -m pipeline.deploy.services up

services-down:
	$(BIN)/python -m pipeline.deploy.services down

services-status:
	$(BIN)/python -m pipeline.deploy.services status

clean-work:
	rm -rf data/work
