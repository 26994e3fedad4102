"""Two-process DDP on the CPU (gloo): replicas stay identical (parameters and the all-gathered memory
bank), rows are sharded, and `torchrun ... mmrank train` runs and resumes."""

import json
import os
import subprocess
import sys

import pytest
import torch
from ddp_replicas import WORLD, free_port, train_replicas
from trainer_data import synth_with_features

pytestmark = pytest.mark.slow  # two-process training runs

SETS = {
    "model.interest.memory_bank": True,
    "train.epochs": 1,
    "train.lora_epochs": 0,
    "train.max_steps": 6,
    "train.eval_every_steps": 6,
    "train.batch_size": 128,
    "train.log_every": 10_000,
}


@pytest.fixture(scope="module")
def data(tmp_path_factory, pytestconfig):
    return synth_with_features(tmp_path_factory, pytestconfig.cache)


def test_replicas_stay_identical(data, tmp_path):
    """Also: the only validation (the last step) improves, so last.pt is current and the final checkpoint
    (with its barrier) is skipped; rank 1 restores best.pt only after rank 0, slowed, has written it."""
    states = train_replicas(data, tmp_path, "em3", SETS, best_delay=1.0)
    assert "bank.vectors" in states[0] and bool(states[0]["bank.present"].any())
    for name, value in states[0].items():
        torch.testing.assert_close(value, states[1][name], rtol=0, atol=0, msg=name)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["train"]["world_size"] == WORLD
    assert metrics["train"]["samples"] == SETS["train.max_steps"] * SETS["train.batch_size"] * WORLD
    assert metrics["train"]["best_step"] == 6


def _torchrun(args: list[str]) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes",
        "1",
        "--nproc_per_node",
        str(WORLD),
        "--rdzv_backend",
        "c10d",
        "--rdzv_endpoint",
        f"127.0.0.1:{free_port()}",
        "-m",
        "mmrank.cli",
        *args,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_torchrun_trains_and_resumes(data, tmp_path):
    out = tmp_path / "run"
    base = [
        "train",
        "--data",
        str(data),
        "--preset",
        "id_only",
        "--out",
        str(out),
        "--set",
        "train.batch_size=128",
        "--set",
        "train.log_every=1000",
    ]
    first = _torchrun([*base, "--max-steps", "3"])
    assert first.returncode == 0, first.stderr[-3000:]
    assert first.stdout.count("train: ") == 1  # rank 0 alone prints the summary
    second = _torchrun([*base, "--max-steps", "6", "--resume"])
    assert second.returncode == 0, second.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert (
        metrics["train"]["world_size"] == WORLD
        and metrics["train"]["steps"] == 6
        and metrics["train"]["resumed"]
    )
