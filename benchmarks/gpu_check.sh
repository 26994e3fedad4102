#!/usr/bin/env bash
# The one GPU check (`make gpu-check`): on a machine with a CUDA GPU and no network, with the torch and
# triton it has (never reinstalled), run the GPU tests of the attention kernels and of the torch serving
# backend (CUDA graphs), the kernel benchmark, then the GPU serving benchmark (benchmarks/gpu_serving.py:
# tritonserver start, parity, closed loop, locust where installed); logs and results land in
# benchmarks/results/ (or $RESULTS). Serving needs the tritonserver of nvidia-pytriton, tritonclient and
# locust. On a host without them and without a package index, the wheels of `make gpu-wheels` (built on a
# machine with one and copied into build/gpu-wheels/ here) are installed with --no-deps into a fresh
# build/gpu-site, put on PYTHONPATH; it holds only those wheels, at this project's versions (torch, numpy
# and the rest stay the host's own). tritonclient's generated code needs protobuf >= its gencode version
# (6.33.5): only where the host's protobuf is older does the fallback (build/gpu-wheels/client/fallback)
# go into build/gpu-site too. Without such wheels the serving benchmark says so and is skipped; copied
# wheels that do not import are a failure, with the import error shown. GPU_CHECK names the parts to run
# (default "kernels serving"; "serving" alone is the serving tests and benchmark). MMRANK_COMMIT names the
# commit in every result where the tree is a copy whose git metadata is missing or stale.
# GPU_CHECK_PACK=FILE.tar.gz packs all of $RESULTS into one file, however the script ends.
# Exit status: non-zero if a part that ran or should have run failed. Budget: under 8 minutes on an H100/H200.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${GPU_PY:-python3}
RESULTS=${RESULTS:-benchmarks/results}
mkdir -p "$RESULTS"
[ -z "${GPU_CHECK_PACK:-}" ] || trap 'tar czf "$GPU_CHECK_PACK" -C "$RESULTS" .' EXIT
export PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
SERVING_IMPORTS='import tritonclient.grpc, sys; from export.triton_launcher import TritonDistribution as T; sys.exit(not T.installed())'
PARTS=" ${GPU_CHECK:-kernels serving} "
copied=0 tests=0 bench=0 serving=0
if [[ "$PARTS" == *" serving "* ]] && compgen -G "build/gpu-wheels/*/*.whl" >/dev/null; then
  copied=1
  rm -rf build/gpu-site
  "$PY" -m pip install -q --no-deps --target build/gpu-site build/gpu-wheels/*/*.whl \
    && export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD/build/gpu-site"
  if ! "$PY" -c "$SERVING_IMPORTS" 2>/dev/null && compgen -G "build/gpu-wheels/*/fallback/*.whl" >/dev/null; then
    echo "gpu-check: the serving wheels do not import with this machine's packages; adding the fallback wheels"
    "$PY" -m pip install -q --no-deps --target build/gpu-site build/gpu-wheels/*/fallback/*.whl
  fi
fi
commit=${MMRANK_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
{
  date -u +%FT%TZ
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  "$PY" -c 'import sys, torch, triton; print("python", sys.version.split()[0], "torch", torch.__version__, "triton", triton.__version__)'
  echo "commit $commit; parts:$PARTS"
} | tee "$RESULTS/kernel_gpu_machine.txt"
# A test log names its commit and every test with its outcome (-v; -rs: why a test skipped), so it
# stands on its own.
run_tests() {
  echo "commit $commit; $(date -u +%FT%TZ)"
  timeout "$1" "$PY" -m pytest -v -rs -p no:cacheprovider "${@:2}"
}
if [[ "$PARTS" == *" kernels "* ]]; then
  run_tests 300 tests/kernels tests/model/test_attention.py tests/model/test_target_attention.py 2>&1 \
    | tee "$RESULTS/kernel_gpu_tests.log"
  tests=${PIPESTATUS[0]}
  timeout 300 "$PY" benchmarks/attention_kernel.py --out "$RESULTS" "$@"
  bench=$?
fi
if [[ "$PARTS" == *" serving "* ]]; then
  # The torch backend in process (programs vs ONNX, CUDA graphs vs eager); the server's part is the benchmark's parity.
  run_tests 120 tests/export/test_torch_serving.py -k "programs_score or cuda_graph" 2>&1 \
    | tee "$RESULTS/gpu_serving_tests.log"
  serving=${PIPESTATUS[0]}
  # Closed-loop client processes: one per 4 cores, at most 4 (one Python client's GIL caps its call rate;
  # on a small machine more processes than that only steal the server's cores: on 2 cores four of them
  # raised p99 at 4 callers from 24 ms to 150 ms).
  procs=$(( $(nproc) / 4 )); procs=$(( procs < 1 ? 1 : procs > 4 ? 4 : procs ))
  if "$PY" -c "$SERVING_IMPORTS" 2>/dev/null; then
    timeout 300 "$PY" benchmarks/gpu_serving.py --out "$RESULTS" --calls 200 --client-processes "$procs" || serving=1
  elif [ "$copied" -eq 1 ]; then
    echo "gpu-check: serving FAILED: the wheels of build/gpu-wheels were installed but tritonclient or the tritonserver does not import:"
    "$PY" -c "$SERVING_IMPORTS" 2>&1 | tail -3
    serving=1
  else
    echo "gpu-check: serving skipped: no wheels in build/gpu-wheels (run make gpu-wheels where a package index is reachable, copy build/gpu-wheels here) and tritonclient or the nvidia-pytriton tritonserver is not importable"
  fi
fi
echo "gpu-check: parts:$PARTS exits: kernel tests $tests, kernel benchmark $bench, serving $serving"
[ "$tests" -eq 0 ] && [ "$bench" -eq 0 ] && [ "$serving" -eq 0 ]
