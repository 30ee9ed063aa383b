# `make demo` and `make test` work on a fresh machine: both create .venv and install the project.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export MVDATA_HOME ?= $(CURDIR)/.mvdata

.PHONY: install demo test lint bench clean

# the C extensions' headers: zlib (the .wandb scanner), libcurl and OpenSSL (the small-file fast path); Debian's
# packages are installed when missing
HEADERS_OK := command -v gcc >/dev/null && [ -f /usr/include/zlib.h ] && [ -f /usr/include/openssl/evp.h ] && command -v curl-config >/dev/null

$(VENV)/.installed: pyproject.toml mvdata_assets/runs/_wandb_scan.c mvdata_assets/datasets/_small_files.c
	@$(HEADERS_OK) || { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q gcc zlib1g-dev \
		libcurl4-openssl-dev libssl-dev; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
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
	rm -rf $(VENV) $(MVDATA_HOME) build *.egg-info mvdata_assets/runs/*.so mvdata_assets/datasets/*.so
