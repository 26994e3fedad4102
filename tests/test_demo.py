"""`mmrank demo` end to end on a small synthetic world: real encoders, training, export, tritonserver.

The demo itself checks the served scores against the PyTorch model and fails above PARITY_ATOL; here we
also check the report, and that a second run reuses every finished step.
"""

import json

import pytest

from export.native_backend import NativeBackend
from mmrank.demo import PARITY_ATOL, DemoConfig, run_demo


def test_demo_trains_serves_and_reuses_finished_steps(tritonserver, tmp_path):
    cfg = DemoConfig(users=150, items=160, events=16_000, requests=40)
    report = run_demo(tmp_path / "demo", cfg)
    s = report["serving"]
    assert s["requests"] == 40 and s["max_abs_diff_vs_pytorch"] <= PARITY_ATOL
    assert s["backend"] == ("onnxruntime" if NativeBackend.built() else "python")  # native where built
    assert report["metrics"]["test"]["auc"] > 0.55 and report["reused"] == []
    assert (
        json.loads((tmp_path / "demo" / "report.json").read_text())["serving"]["candidates"]
        == s["candidates"]
    )
    assert "served AUC" in (tmp_path / "demo" / "report.md").read_text()

    again = run_demo(tmp_path / "demo", cfg)
    assert again["reused"] == ["data", "train", "export"]
    assert again["serving"]["served_auc"] == pytest.approx(s["served_auc"], abs=1e-6)
