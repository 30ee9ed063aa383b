# `make demo` and `make test` work on a fresh machine: both create .venv and install the project.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
export MVDATA_HOME ?= $(CURDIR)/.mvdata
DEMO_RUNS := $(MVDATA_HOME)/demo/wandb-runs

.PHONY: install demo test lint bench clean

$(VENV)/.installed: pyproject.toml mvdata_assets/runs/_wandb_scan.c
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

install: $(VENV)/.installed

demo: install
	$(BIN)/mvdata demo-runs $(DEMO_RUNS)
	@mkdir -p $(MVDATA_HOME)/dagster
	@echo "materialising group:wandb (log: $(MVDATA_HOME)/demo/materialize.log)"
	@DAGSTER_HOME=$(MVDATA_HOME)/dagster MVDATA_WANDB_OFFLINE_DIRS=$(DEMO_RUNS) \
		$(BIN)/dagster asset materialize -m mvdata_assets.definitions --select 'group:wandb' \
		> $(MVDATA_HOME)/demo/materialize.log 2>&1 \
		|| (tail -n 40 $(MVDATA_HOME)/demo/materialize.log; exit 1)
	@grep -cE "STEP_SUCCESS" $(MVDATA_HOME)/demo/materialize.log | xargs -I{} echo "{} steps succeeded"
	MVDATA_WANDB_OFFLINE_DIRS=$(DEMO_RUNS) $(BIN)/mvdata report

test: install
	$(BIN)/python -m pytest

lint: install
	$(BIN)/ruff check . && $(BIN)/ruff format --check .

bench: install
	$(BIN)/python bench/offline_ingest.py

clean:
	rm -rf $(VENV) $(MVDATA_HOME) build *.egg-info mvdata_assets/runs/*.so
