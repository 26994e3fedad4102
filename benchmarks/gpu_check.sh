#!/usr/bin/env bash
# The one GPU check (`make gpu-check`): on a machine with a CUDA GPU and no network, with the torch and
# triton it has (never reinstalled), run the GPU tests of the attention kernels, then the kernel
# benchmark; logs and results land in benchmarks/results/ (or $RESULTS). Exit status: non-zero if
# either failed. Budget: about 5 minutes on an H100/H200, most of it Triton compiling the kernels.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_PY:-python3}
RESULTS=${RESULTS:-benchmarks/results}
mkdir -p "$RESULTS"
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__)'
} | tee "$RESULTS/kernel_gpu_machine.txt"
timeout 300 "$PY" -m pytest -q -p no:cacheprovider \
  tests/kernels tests/model/test_attention.py tests/model/test_target_attention.py 2>&1 \
  | tee "$RESULTS/kernel_gpu_tests.log"
tests=${PIPESTATUS[0]}
timeout 300 "$PY" benchmarks/attention_kernel.py --out "$RESULTS" "$@"
bench=$?
echo "gpu-check: tests exit $tests, benchmark exit $bench"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ]
