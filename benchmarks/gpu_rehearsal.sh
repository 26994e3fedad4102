#!/usr/bin/env bash
# A dry run, on a CPU machine, of the serving part of `make gpu-check` as it runs on a GPU host without a
# package index (`make gpu-rehearsal`): such a host runs a copy of the working tree under its own CPython
# 3.12 image, with NumPy 2 and no tritonclient, locust or flask; only the wheels of `make gpu-wheels`,
# copied there, add to it. This builds a venv shaped like such an image (older protobuf and werkzeug than
# the wheels need, so the fallback and the shadowing are exercised), copies the tree (tracked and
# untracked-not-ignored files plus build/gpu-wheels), and runs the serving part with its results packed
# into one file. The ranking program runs on the CPU here: the numbers check the path, they are no GPU
# numbers.
# Writes build/gpu-rehearsal/{gpu_check.log,gpu_check.tar.gz}; exit status: gpu_check.sh's.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$PWD/build/gpu-rehearsal
find_python312() {
  if python3.12 -c '' 2>/dev/null; then echo python3.12; return; fi
  ls -d "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python 2>/dev/null | tail -1
}
PY312=${PY312:-$(find_python312)}
[ -n "$PY312" ] || { echo "gpu-rehearsal: no CPython 3.12 found; set PY312=/path/to/python3.12" >&2; exit 2; }
compgen -G "build/gpu-wheels/*/*.whl" >/dev/null || { echo "gpu-rehearsal: no wheels in build/gpu-wheels: run make gpu-wheels" >&2; exit 2; }
mkdir -p "$WORK"
if [ ! -f "$WORK/venv/.installed" ]; then  # a venv cannot be moved into place: mark it complete instead
  rm -rf "$WORK/venv"
  "$PY312" -m venv "$WORK/venv"
  "$WORK/venv/bin/python" -m pip install -q torch==2.13.0 "numpy>=2" pandas pyarrow pillow tqdm matplotlib \
    scikit-learn transformers onnx onnxruntime onnxscript pytest hypothesis triton msgpack psutil requests \
    "protobuf<6" "werkzeug<3.1"
  touch "$WORK/venv/.installed"
fi
rm -rf "$WORK/tree" "$WORK/results" "$WORK/gpu_check.log" "$WORK/gpu_check.tar.gz"
mkdir -p "$WORK/tree/build" "$WORK/results"
git ls-files -z -co --exclude-standard | xargs -0 cp --parents -t "$WORK/tree"
cp -r build/gpu-wheels "$WORK/tree/build/"
commit=$(python3 -c 'from common.provenance import code_commit; print(code_commit())')
cd "$WORK/tree"
PATH="$WORK/venv/bin:$PATH" MMRANK_COMMIT="$commit (rehearsal)" GPU_CHECK=serving RESULTS="$WORK/results" \
  GPU_CHECK_PACK="$WORK/gpu_check.tar.gz" bash benchmarks/gpu_check.sh 2>&1 | tee "$WORK/gpu_check.log"
