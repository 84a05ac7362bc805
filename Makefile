# curvscope: `make demo` runs the main job on the built-in example, `make test` runs the checks.
# Everything is installed from nothing into .venv. torch==2.13.0 goes first so that pip takes
# the CPU build from this machine's disk instead of a multi-GB CUDA build.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
BENCH_VENV := .venv-bench
BENCH_STAMP := $(BENCH_VENV)/.installed
TORCH := torch==2.13.0

.PHONY: install test lint format demo bench bench-scale clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[report,dev]'
	touch $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests examples bench
	$(VENV)/bin/ruff format --check src tests examples bench

format: $(STAMP)
	$(VENV)/bin/ruff check --fix src tests examples bench
	$(VENV)/bin/ruff format src tests examples bench

# two test workers on two cores: one thread each, or OpenMP threads fight over the cores
test: lint
	OMP_NUM_THREADS=1 $(PY) -m pytest -n 2 --dist loadfile

demo: $(STAMP)
	$(VENV)/bin/curvscope analyze

$(BENCH_STAMP): bench/requirements.txt bench/requirements-nodeps.txt pyproject.toml
	test -x $(BENCH_VENV)/bin/python || $(PYTHON) -m venv $(BENCH_VENV)
	$(BENCH_VENV)/bin/python -m pip install -q --upgrade pip
	$(BENCH_VENV)/bin/python -m pip install -q $(TORCH)
	$(BENCH_VENV)/bin/python -m pip install -q -e '.[report]'
	$(BENCH_VENV)/bin/python -m pip install -q -r bench/requirements.txt
	$(BENCH_VENV)/bin/python -m pip install -q --no-deps -r bench/requirements-nodeps.txt
	$(BENCH_VENV)/bin/python -c "import torch; v = torch.__version__; assert v.startswith('2.13.0'), v"
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python -m bench --write BENCHMARKS.md

# issue 9's speed cases alone (~30 min): replaces only their sections of BENCHMARKS.md
bench-scale: $(BENCH_STAMP)
	$(BENCH_VENV)/bin/python -m bench --only scale --write BENCHMARKS.md

clean:
	rm -rf $(VENV) $(BENCH_VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
