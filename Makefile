# Fresh machine: `make demo` (the embedded end-to-end demo) and `make test` (the whole suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONSTRAINTS := .ci/constraints.txt

.PHONY: venv demo test test-fast lint clean peers slurm-up slurm-down

$(STAMP): setup.py $(CONSTRAINTS)
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the local CPU wheel; everything after is constrained to it so no CUDA build is pulled.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e '.[dev,demo]'
	touch $(STAMP)

venv: $(STAMP)

# Peer environment for the parity tests and benchmarks/peers.py (open_clip needs torchvision, which does not import
# beside .venv's torch 2.13.0 CPU wheel, so the references live in their own venv). Idempotent via its stamp.
PEERS := .venv-peers
PEERS_STAMP := $(PEERS)/.installed
$(PEERS_STAMP): benchmarks/peers/requirements.txt
	test -d $(PEERS) || $(PY) -m venv $(PEERS)
	$(PEERS)/bin/pip install -q --upgrade pip
	$(PEERS)/bin/pip install -q -r benchmarks/peers/requirements.txt
	touch $(PEERS_STAMP)

peers: $(PEERS_STAMP)

demo: $(STAMP)
	$(BIN)/medfm demo --out runs/demo

test: $(STAMP) $(PEERS_STAMP)
	$(BIN)/ruff check .
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest -q tests

test-fast: $(STAMP) $(PEERS_STAMP)
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check .

# A one-node SLURM cluster on this machine (root; Debian's slurmd/slurmctld/munge, state in /tmp/medfm-slurm):
# `make slurm-up`, then `export SLURM_CONF=/tmp/medfm-slurm/slurm.conf` if /etc/slurm/slurm.conf was taken.
slurm-up:
	launch/slurm_local.sh install
	launch/slurm_local.sh up

slurm-down:
	launch/slurm_local.sh down

clean:
	rm -rf $(VENV) runs build *.egg-info
