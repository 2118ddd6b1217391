# Fresh machine: `make demo` (the embedded end-to-end demo) and `make test` (the whole suite).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
CONSTRAINTS := .ci/constraints.txt

.PHONY: venv demo test test-fast lint clean

$(STAMP): setup.py $(CONSTRAINTS)
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# torch first, from the local CPU wheel; everything after is constrained to it so no CUDA build is pulled.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c $(CONSTRAINTS) -e '.[dev,demo]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/medfm demo --out runs/demo

test: $(STAMP)
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest -q tests

test-fast: $(STAMP)
	DS_ACCELERATOR=cpu $(BIN)/python -m pytest -q -m "not slow" tests

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) runs build *.egg-info
