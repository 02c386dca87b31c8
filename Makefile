# The two commands a new user runs: `make demo` and `make test`. Each sets up .venv when needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
# CPU torch for tests and CI; leave it out (pip install -e .) to keep your own CUDA build.
CONSTRAINTS := constraints-cpu.txt

.PHONY: install test test-all demo lint bench-smoke gpu-wheels clean

$(STAMP): pyproject.toml $(CONSTRAINTS)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e '.[dev,notebook,s3,demo]'
	touch $(STAMP)

install: $(STAMP)

# lint first: ruff and mypy keep the style honest (../shared/STYLE.md lesson 14)
test: lint
	$(PY) -m pytest -q -m 'not slow'

test-all: $(STAMP)
	$(PY) -m pytest -q

demo: $(STAMP)
	$(PY) -m tracestore.demo

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests benchmarks
	$(VENV)/bin/mypy src
	$(VENV)/bin/lint-imports  # the layers of docs/architecture.md ([tool.importlinter] in pyproject.toml)

bench-smoke: $(STAMP)
	for b in benchmarks/bench_*.py; do $(PY) $$b --smoke || exit 1; done

# the wheels benchmarks/gpu_check.sh installs offline on the GPU machine (Python 3.12), into gpu_wheels/
gpu-wheels:
	bash benchmarks/gpu_wheels.sh

clean:
	rm -rf $(VENV) .pytest_cache build src/*.egg-info
