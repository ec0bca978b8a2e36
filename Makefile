# Everything runs from a project-local virtual environment (.venv by default).
# Overrides: make test PYTEST_ARGS='-k quorum -x'   make setup VENV=/tmp/v PYTHON=python3.12
PYTHON ?= python3
VENV ?= .venv
PYTEST_ARGS ?=
# The build installed when the venv has no torch yet. Pinned because a bare
# `torch` requirement can resolve to a multi-GB CUDA build; to use a GPU build,
# install it into the venv first (see README) and setup leaves it alone.
TORCH_VERSION ?= 2.13.0

BIN := $(VENV)/bin
STAMP := $(VENV)/.stamp

.PHONY: setup local test lab-deps protos clean

setup: $(STAMP)

# The stamp makes repeated runs instant; it is rebuilt when pyproject.toml changes.
$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -c 'import torch' 2>/dev/null || $(BIN)/python -m pip install 'torch==$(TORCH_VERSION)'
	$(BIN)/python -m pip install -e '.[dev]'
	touch $@

# The main job: coordinator + 4 peers train the built-in model on loopback; summary.json and loss.png.
local: setup
	$(BIN)/swarm local --peers 4 --steps 200 --inner-steps 20 --out runs/local

test: setup lab-deps
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# The WAN lab (scripts/wanlab.py, tests/test_wanlab.py) needs ip and tc (iproute2) and, for its NAT
# routers, nft (nftables). Installed when root with apt-get; otherwise says what to run (its tests skip).
lab-deps:
	@PATH="$$PATH:/usr/sbin:/sbin"; pkgs=""; \
	{ command -v ip && command -v tc; } >/dev/null || pkgs="iproute2"; \
	command -v nft >/dev/null || pkgs="$$pkgs nftables"; \
	[ -z "$$pkgs" ] && exit 0; \
	if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		export DEBIAN_FRONTEND=noninteractive; \
		apt-get install -y --no-install-recommends $$pkgs || { apt-get update && apt-get install -y --no-install-recommends $$pkgs; } \
		|| echo "lab-deps: could not install $$pkgs; the WAN lab tests will skip"; \
	else \
		echo "lab-deps: missing $$pkgs; the WAN lab tests will skip. To run them: sudo apt-get install -y $$pkgs"; \
	fi

# Regenerate swarm/proto/ from protos/ (needs grpcio-tools from the dev extra).
protos: setup
	$(BIN)/python scripts/gen_protos.py

# Build outputs and caches; keeps the venv and runs/ (results).
clean:
	rm -rf build dist *.egg-info .pytest_cache .hypothesis .ruff_cache
	find $(wildcard swarm kernels peers scripts tests) -name __pycache__ -type d -prune -exec rm -rf {} +
