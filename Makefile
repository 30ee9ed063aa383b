# `make demo` and `make test` work on a fresh machine: both create .venv and install the project.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export MVDATA_HOME ?= $(CURDIR)/.mvdata

.PHONY: install demo test lint bench bench-peers clean

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

# the benchmarks' peers, each in a venv of its own under bench/.data (not project dependencies): img2dataset for
# bench/url_lists.py and bench/cluster.py; dr-wandb for bench/api_sync.py, which declares Python >= 3.12 but runs on
# 3.11, so its wheels are installed without that check
PEERS := bench/.data/peers
bench-peers: $(PEERS)/img2dataset/bin/img2dataset $(PEERS)/dr-wandb/bin/wandb-export

$(PEERS)/img2dataset/bin/img2dataset:
	$(PYTHON) -m venv $(PEERS)/img2dataset
	$(PEERS)/img2dataset/bin/pip install -q img2dataset==1.47.0

$(PEERS)/dr-wandb/bin/wandb-export:
	$(PYTHON) -m venv $(PEERS)/dr-wandb
	$(PEERS)/dr-wandb/bin/pip download -q --no-deps --python-version 3.12 --only-binary=:all: -d $(PEERS)/dr-wandb/wheels \
	  dr-wandb==3.0.3 dr-ds==0.1.4
	$(PEERS)/dr-wandb/bin/pip install -q --no-deps --ignore-requires-python $(PEERS)/dr-wandb/wheels/*.whl
	$(PEERS)/dr-wandb/bin/pip install -q pandas pyarrow srsly typer pydantic wandb==0.31.0

clean:
	rm -rf $(VENV) $(MVDATA_HOME) build *.egg-info mvdata_assets/runs/*.so
