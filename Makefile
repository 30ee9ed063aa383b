# `make demo` and `make test` work on a fresh machine: both create .venv and install the project.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export MVDATA_HOME ?= $(CURDIR)/.mvdata

.PHONY: install demo test lint bench clean

# no root needed: pycurl's wheel bundles libcurl, and the C .wandb scanner is optional (built when gcc and zlib's
# headers are there, else the reader's pyarrow fallback is used)
$(VENV)/.installed: pyproject.toml mvdata_assets/runs/_wandb_scan.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev,cluster]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/mvdata demo

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: install
	$(BIN)/python bench/offline_ingest.py

clean:
	rm -rf $(VENV) $(MVDATA_HOME) build *.egg-info mvdata_assets/runs/*.so
