"""The GPU check's scripts on this CPU: the serving benchmark end to end at a tiny shape against the real
tritonserver (the program on the CPU), and gpu_check.sh's part selection, packing and test logs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]


def test_serving_benchmark_reports_parity_latency_and_locust(tritonserver, tmp_path):
    out = tmp_path / "out"
    args = "--shapes 8x4 --concurrency 1,2 --calls 20 --requests 4 --d 16 --locust-seconds 2 --client-processes 2"
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_serving.py"), "--out", str(out), *args.split()],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((out / "torch_serving_latency_cpu.json").read_text())
    (row,) = report["rows"]
    assert (row["N"], row["L"], row["d"]) == (8, 4, 16)
    # fp16 program on the server against the fp32 ONNX graph in process.
    assert row["parity"]["requests"] == 4 and row["parity"]["max_abs_diff"] < 2e-2
    for c in (1, 2):
        assert row[f"c{c}"]["calls"] == 20 and row[f"c{c}"]["failures"] == 0
        # Warm-up calls fall outside the counters read around the level, in one process or two.
        assert row[f"c{c}"]["server"]["item_lookup"]["requests"] == 20
    assert 0 < row["in_process"]["p50_ms"] <= row["in_process"]["p99_ms"]
    assert [s["users"] for s in row["locust"]] == [1, 4, 16]
    assert all(s["failures"] == 0 and s["requests"] > 0 for s in row["locust"])
    text = (out / "torch_serving_latency_cpu.md").read_text()
    assert (
        "| N | L | callers | calls | failures | p50 ms | p95 ms | p99 ms |" in text
        and "| 8 | 4 | 2 | 20 | 0 |" in text
        and "| 8 | 4 | 16 |" in text  # the parity row, d=16
        and "N=8, L=4 (run folder torch_load_cpu_8x4/)" in text
        and "## Where the time goes at 1 caller (ms)" in text
    )
    assert (out / "torch_serving_latency_cpu.png").stat().st_size > 0
    assert (out / "torch_load_cpu_8x4" / "summary.json").exists()


def gpu_check(tmp_path: Path, python: str, parts: str, **env: str) -> subprocess.CompletedProcess:
    """gpu_check.sh with its results and pack under tmp_path."""
    env = {
        **os.environ,
        "GPU_PY": python,
        "GPU_CHECK": parts,
        "RESULTS": str(tmp_path / "results"),
        "GPU_CHECK_PACK": str(tmp_path / "gpu_check.tar.gz"),
        **env,
    }
    return subprocess.run(
        ["bash", str(ROOT / "benchmarks" / "gpu_check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_gpu_check_runs_only_the_parts_asked_and_packs_its_results(tmp_path):
    done = gpu_check(tmp_path, sys.executable, "none", MMRANK_COMMIT="abc1234")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "kernel tests 0, kernel benchmark 0, serving 0" in done.stdout
    with tarfile.open(tmp_path / "gpu_check.tar.gz") as tar:
        names = {Path(n).name for n in tar.getnames()}
        machine = tar.extractfile("./kernel_gpu_machine.txt").read().decode()
    assert names - {""} == {"kernel_gpu_machine.txt"}
    assert "commit abc1234; parts: none" in machine and f"torch {torch.__version__}" in machine


def test_gpu_check_fails_when_a_part_fails_and_still_packs(tmp_path):
    python = tmp_path / "python"
    # A python that fails everything it is asked to run but the machine line.
    python.write_text(
        f'#!/bin/sh\ncase "$*" in *"import sys, torch"*) exec {sys.executable} "$@";; esac\nexit 3\n'
    )
    python.chmod(0o755)
    done = gpu_check(tmp_path, str(python), "kernels")
    assert done.returncode != 0
    assert "kernel tests 3, kernel benchmark 3, serving 0" in done.stdout
    assert (tmp_path / "gpu_check.tar.gz").exists()


def test_gpu_check_test_logs_name_the_commit_and_every_test(tmp_path):
    python = tmp_path / "python"
    # A python that answers the machine line and, for pytest, prints the arguments it was given.
    python.write_text(
        f'#!/bin/sh\ncase "$*" in *"import sys, torch"*) exec {sys.executable} "$@";; '
        '*"-m pytest"*) echo "pytest args: $*"; exit 0;; esac\nexit 0\n'
    )
    python.chmod(0o755)
    done = gpu_check(tmp_path, str(python), "kernels", MMRANK_COMMIT="abc1234")
    assert done.returncode == 0, done.stdout + done.stderr
    log = (tmp_path / "results" / "kernel_gpu_tests.log").read_text().splitlines()
    assert log[0].startswith("commit abc1234; ")
    assert " -v " in log[1] and "tests/kernels" in log[1]
