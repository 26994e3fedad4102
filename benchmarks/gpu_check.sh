#!/usr/bin/env bash
# The one GPU check (`make gpu-check`): on a machine with a CUDA GPU and no network, with the torch and
# triton it has (never reinstalled), run the GPU tests of the attention kernels and of the torch serving
# backend (CUDA graphs), the kernel benchmark, then the GPU serving benchmark (benchmarks/gpu_serving.py:
# tritonserver start, parity, closed loop, locust where installed); logs and results land in
# benchmarks/results/ (or $RESULTS). Serving needs the tritonserver of nvidia-pytriton and tritonclient
# (+ grpcio, python-rapidjson): the wheels of `make gpu-wheels`, carried to the machine (build/gpu-wheels/,
# one folder per call), are installed here with --no-deps into build/gpu-site, put on PYTHONPATH; it holds
# only those wheels, so it shadows none of the machine's packages (torch, numpy, protobuf stay its own);
# without them the serving benchmark says so and is skipped. Exit status: non-zero if a part that ran failed. Budget: under 8
# minutes on an H100/H200.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_PY:-python3}
RESULTS=${RESULTS:-benchmarks/results}
mkdir -p "$RESULTS"
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
if compgen -G "build/gpu-wheels/*/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-deps --target build/gpu-site build/gpu-wheels/*/*.whl \
    && export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/build/gpu-site"
fi
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
# The torch backend in process (programs vs ONNX, CUDA graphs vs eager); the server's part is the benchmark's parity.
timeout 120 "$PY" -m pytest -q -p no:cacheprovider tests/export/test_torch_serving.py -k "programs_score or cuda_graph" 2>&1 \
  | tee "$RESULTS/gpu_serving_tests.log"
serving=${PIPESTATUS[0]}
if "$PY" -c 'import tritonclient.grpc, sys; from export.triton_launcher import TritonDistribution as T; sys.exit(not T.installed())' 2>/dev/null; then
  timeout 240 "$PY" benchmarks/gpu_serving.py --out "$RESULTS" --calls 200 || serving=1
else
  echo "gpu-check: serving skipped: tritonclient or the nvidia-pytriton tritonserver is not importable"
fi
echo "gpu-check: tests exit $tests, benchmark exit $bench, serving exit $serving"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ] && [ "$serving" -eq 0 ]
