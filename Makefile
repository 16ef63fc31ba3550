# The two commands a newcomer runs: `make demo` and `make test`.
# Both create the virtual environment and install what they need.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PORT   ?= 6432
SHARDS ?= 2
DEMO_DIR ?= .demo
BENCH_SECONDS ?= 10

.PHONY: demo test unit integration bench lint clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/shardwire demo --port $(PORT) --shards $(SHARDS) --data-dir $(DEMO_DIR)

test: $(STAMP)
	$(PY) -m pytest -q tests

unit: $(STAMP)
	$(PY) -m pytest -q tests/unit

integration: $(STAMP)
	$(PY) -m pytest -q tests/integration

bench: $(STAMP)
	BENCH_SECONDS=$(BENCH_SECONDS) $(PY) bench/run.py
	BENCH_SECONDS=$(BENCH_SECONDS) $(PY) bench/sharded.py
	$(PY) bench/instructions.py
	$(PY) bench/scatter.py
	$(PY) bench/transactions.py
	BENCH_SECONDS=5 $(PY) bench/replicas.py
	BENCH_SECONDS=5 $(PY) bench/workers.py

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench
	$(VENV)/bin/mypy src

clean:
	rm -rf $(VENV) $(DEMO_DIR) build src/*.egg-info
