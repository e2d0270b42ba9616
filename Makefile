# Setup and the two quick-start commands. Every target creates or reuses .venv.
PYTHON_SYS ?= python3
VENV       := .venv
PY         := $(VENV)/bin/python
TORCH_PIN  := torch==2.13.0
STAMP      := $(VENV)/.arflow-installed
# Fashion-MNIST (configs/compare/fashion-mnist-cpu.yaml) comes from Debian's dataset-fashion-mnist package.
FASHION_MNIST := /usr/share/datasets/fashion-mnist/t10k-labels-idx1-ubyte.gz
SUDO       := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

# Caches live in the user's cache folder so a fresh clone does not recompile a DeepSpeed op a config asks for
# (the training path itself builds none: train/engine.py, import_deepspeed).
export TORCH_EXTENSIONS_DIR ?= $(HOME)/.cache/torch_extensions
export DS_ACCELERATOR ?= cpu
export MLFLOW_DISABLE_TELEMETRY := true
export RAY_USAGE_STATS_ENABLED := 0
export PYTHONUNBUFFERED := 1
# As in an activated .venv: every process (pytest, Ray workers, `arflow` subprocesses, jobs) finds this
# environment's tools (arflow, and the ninja DeepSpeed builds ops with) before any system copy.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: install compile-project demo test test-fast test-floors clean

install: $(STAMP) $(FASHION_MNIST)

$(FASHION_MNIST):
	$(SUDO) apt-get install -y dataset-fashion-mnist || \
		($(SUDO) apt-get update && $(SUDO) apt-get install -y dataset-fashion-mnist)

$(VENV)/bin/python:
	$(PYTHON_SYS) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

# torch is pinned and installed FIRST: otherwise deepspeed pulls the newest CUDA build.
$(STAMP): pyproject.toml | $(VENV)/bin/python
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e '.[dev,eval]'
	touch $(STAMP)

demo: install compile-project
	$(VENV)/bin/arflow demo

# Two pytest workers, a test file each at a time (module fixtures stay shared); each file's Ray runs wait on
# process starts as much as they compute, so two overlap well on 2 cores.
PYTEST_WORKERS ?= 2
# Each worker's math libraries (OpenMP for torch, OpenBLAS for numpy and scipy) get the worker's share of the
# cores, unless the environment sets OMP_NUM_THREADS: on a machine the workers keep busy, more threads than that
# spin-wait (docs/architecture.md, "Where the suite's CPU goes"). Ray Train's workers set their own.
TEST_THREADS ?= $(shell n=$$(( $$(nproc) / $(PYTEST_WORKERS) )); [ $$n -ge 1 ] && echo $$n || echo 1)

# The editable install leaves our own modules uncompiled (pip compiles the others): compile them once, so that no
# process compiles them again where the environment says not to write bytecode (PYTHONDONTWRITEBYTECODE).
compile-project:
	$(PY) -m compileall -q arflow_scale tools

test: export OMP_NUM_THREADS ?= $(TEST_THREADS)
test: install compile-project
	$(PY) -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile --durations=25

test-fast: install compile-project
	$(PY) -m pytest -q -m "not slow"

# The suite on the oldest DeepSpeed, Ray and MLflow that pyproject.toml admits (tools/floor_constraints.py pins
# them), in a venv of its own; torch stays at TORCH_PIN.
FLOORS_VENV := .venv-floors

test-floors: $(FASHION_MNIST)
	$(PYTHON_SYS) -m venv $(FLOORS_VENV)
	$(FLOORS_VENV)/bin/python -m pip install -q --upgrade pip
	$(FLOORS_VENV)/bin/python -m pip install -q $(TORCH_PIN)
	$(FLOORS_VENV)/bin/python tools/floor_constraints.py > $(FLOORS_VENV)/floors.txt
	$(FLOORS_VENV)/bin/python -m pip install -q -e '.[dev,eval]' -c $(FLOORS_VENV)/floors.txt
	PATH="$(CURDIR)/$(FLOORS_VENV)/bin:$$PATH" $(FLOORS_VENV)/bin/python -m pytest -q -n $(PYTEST_WORKERS) --dist loadfile

clean:
	rm -rf runs mlruns .ray_tmp .pytest_cache
