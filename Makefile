# ToolServer: `make run` starts the manager on the embedded default, `make test` runs the whole suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
CONFIG ?= config/manager.yml

.PHONY: venv run test test-fast lint node-image docker-ready bench clean

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check -U pip
	$(BIN)/pip install -q --disable-pip-version-check -e '.[dev,postgres,notebook]'
	touch $@

venv: $(STAMP)

run: venv
	bash scripts/ensure-sandbox.sh
	$(BIN)/toolserver manager --config $(CONFIG)

# Starts dockerd when it is not running and builds the node image the Docker tests need.
docker-ready: venv
	bash scripts/ensure-docker.sh
	$(MAKE) node-image

node-image: venv
	bash scripts/build-node-image.sh

test: venv docker-ready
	bash scripts/ensure-sandbox.sh
	bash scripts/ensure-postgres.sh
	bash scripts/ensure-tmux.sh
	bash scripts/ensure-chromium.sh
	bash scripts/ensure-inspector.sh
	$(BIN)/ruff check src tests bench
	$(BIN)/pytest

# The suite without Docker (for machines without a Docker Engine).
test-fast: venv
	bash scripts/ensure-sandbox.sh
	bash scripts/ensure-tmux.sh
	$(BIN)/pytest -m "not docker"

lint: venv
	$(BIN)/ruff check src tests bench
	$(BIN)/ruff format --check src tests bench

# The benchmark suite; writes docs/benchmarks.md and docs/session_ready.png. Docker figures need
# dockerd and the node image, which it sets up when it can.
bench: venv
	$(BIN)/pip install -q --disable-pip-version-check -e '.[bench]'
	-$(MAKE) docker-ready
	$(BIN)/python -m bench
	# the two-engine swarm test (a second dockerd in a network namespace; ~4 min here, so not in make test)
	-$(BIN)/pytest tests/faults/test_swarm_engines.py -m two_engines -q

clean:
	rm -rf $(VENV) data build dist *.egg-info
