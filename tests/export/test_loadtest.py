"""`mmrank loadtest`: a short locust run against the real tritonserver, and its input checks.

The smoke run serves the small export of conftest.py and draws requests from a synthetic dataset with
the same item and user counts, so every id is one the item table holds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from clients.loadtest import LoadTestConfig, check_loopback, percentiles, run_loadtest, summarise
from clients.request_sample import SampleConfig, draw_requests
from export.triton_launcher import free_port
from mmrank.cli import main
from mmrank.errors import MMRankError

REPORTS = [
    "requests.npz",
    "calls.csv",
    "locust_stats.csv",
    "locust_stats_history.csv",
    "locust_failures.csv",
    "locust_exceptions.csv",
    "locust.html",
    "summary.json",
    "summary.md",
    "latency_throughput.png",
]


@pytest.fixture(scope="module")
def tiny_data(small_export, tmp_path_factory):
    """A synthetic dataset with the served model's item and user counts."""
    from trainer.data.synth import SynthConfig, generate

    schema = small_export.model.schema
    out = tmp_path_factory.mktemp("loadtest") / "data"
    generate(out, SynthConfig(users=schema.num_users, items=schema.num_items, events=3000))
    return out


def test_locust_smoke_run_has_no_failures_and_writes_every_report(triton_server, tiny_data, tmp_path):
    cfg = LoadTestConfig(
        url=triton_server.grpc_url,
        user_steps=(1, 2),
        duration_s=5.0,
        sample=SampleConfig(candidates=20, history=5, requests=50),
    )
    summary = run_loadtest(tmp_path, tiny_data, cfg)
    steps = summary["steps"]
    assert [s["users"] for s in steps] == [1, 2]
    assert all(s["requests"] > 0 and s["failures"] == 0 for s in steps), steps
    assert all(s["candidates_per_s"] == pytest.approx(20 * s["requests_per_s"]) for s in steps)
    for name in REPORTS:
        assert (tmp_path / name).stat().st_size > 0, name
    assert json.loads((tmp_path / "summary.json").read_text())["steps"] == steps


def test_requests_have_n_candidates_and_l_history_ids_of_real_test_requests(small_export, tiny_data):
    schema = small_export.model.schema
    sample = draw_requests(tiny_data, SampleConfig(candidates=20, history=5, requests=10, seed=3))
    assert sample.histories.shape == (len(sample), 5) and sample.candidates.shape == (len(sample), 20)
    assert 0 < len(sample) <= 10
    assert sample.histories.min() >= 1 and sample.candidates.max() <= schema.num_items
    assert sample.users.min() >= 1 and sample.users.max() <= schema.num_users
    again = draw_requests(tiny_data, SampleConfig(candidates=20, history=5, requests=10, seed=3))
    np.testing.assert_array_equal(sample.candidates, again.candidates)


def test_summary_counts_each_step_and_takes_nearest_rank_percentiles():
    calls = {
        "step": np.array([0] * 100 + [1] * 4),
        "users": np.array([1] * 100 + [2] * 4),
        "latency_ms": np.concatenate([np.arange(1, 101, dtype=float), [5.0, 6.0, 7.0, 5000.0]]),
        "ok": np.array([1] * 100 + [1, 1, 1, 0]),
        "candidates": np.full(104, 10),
    }
    steps = summarise(calls, LoadTestConfig(user_steps=(1, 2, 4), duration_s=2.0))
    assert [s["requests"] for s in steps] == [100, 4, 0]
    assert [s["failures"] for s in steps] == [0, 1, 0]
    assert (steps[0]["p50_ms"], steps[0]["p95_ms"], steps[0]["p99_ms"]) == (50.0, 95.0, 99.0)
    assert steps[1]["p99_ms"] == 5000.0  # a failed call's time counts
    assert steps[1]["requests_per_s"] == 1.5 and steps[1]["candidates_per_s"] == 15.0
    assert np.isnan(percentiles(np.array([]))["p50_ms"])


@pytest.mark.parametrize("url", ["10.1.2.3:8001", "8.8.8.8:8001", "127.0.0.1", "host:port"])
def test_non_loopback_or_malformed_addresses_are_refused(url):
    with pytest.raises(MMRankError, match="loopback|HOST:PORT"):
        check_loopback(url)


def test_loopback_addresses_pass():
    assert check_loopback("127.0.0.1:8001") == ("127.0.0.1", 8001)
    assert check_loopback("localhost:1")[1] == 1


def test_cli_says_in_one_line_what_is_wrong(tmp_path, capsys):
    assert main(["loadtest", "--url", "10.0.0.1:8001", "--out", str(tmp_path), "--data", "x"]) == 1
    assert "10.0.0.1 is not a loopback address" in capsys.readouterr().err
    port = free_port()
    assert main(["loadtest", "--url", f"127.0.0.1:{port}", "--out", str(tmp_path), "--data", "x"]) == 1
    err = capsys.readouterr().err.strip()
    assert "no ready model 'rank'" in err and len(err.splitlines()) == 1
    with pytest.raises(MMRankError, match="not a dataset folder"):
        draw_requests(tmp_path / "missing")


METRICS_TEXT = """# HELP nv_inference_request_success Number of successful inference requests
nv_inference_request_success{model="ranking",version="1"} 10
nv_inference_request_success{model="ranking",version="2"} 5
nv_inference_exec_count{model="ranking",version="1"} 5
nv_inference_queue_duration_us{model="ranking",version="1"} 1500
nv_inference_compute_infer_duration_us{model="ranking",version="1"} 3000
nv_inference_request_success{model="rank",version="1"} 15
nv_gpu_utilization{gpu_uuid="x"} 0.5
"""


def test_triton_counters_sum_versions_and_give_times_per_request():
    from clients.triton_metrics import parse, per_request

    after = parse(METRICS_TEXT)
    assert after["ranking"]["success"] == 15 and after["ranking"]["queue_us"] == 1500
    before = parse('nv_inference_request_success{model="ranking",version="1"} 5\n')
    times = per_request(before, after)
    assert times["ranking"].requests == 10 and times["ranking"].batch == 2.0
    assert times["ranking"].queue_us == 150.0 and times["ranking"].compute_us == 300.0
    assert times["rank"].requests == 15 and np.isnan(times["rank"].batch)


def test_latency_benchmark_runs_against_the_real_server(triton_server, tiny_data, tmp_path, monkeypatch):
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "serving_latency.py"
    spec = importlib.util.spec_from_file_location("serving_latency", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    out = tmp_path / "latency.md"
    args = ["--url", triton_server.grpc_url, "--metrics-url", f"127.0.0.1:{triton_server.metrics_port}"]
    args += ["--repo", str(triton_server.repo), "--data", str(tiny_data), "--out", str(out)]
    args += ["--concurrency", "1,2", "--calls", "20", "--warmup", "2", "--candidates", "20", "--history", "5"]
    assert bench.main(args) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert all(r["failures"] == 0 and r["calls"] == 20 for r in report["closed_loop"].values())
    assert all(r["client_cores"] > 0 for r in report["closed_loop"].values())
    # The python backend's rank is one step: item_lookup runs the ranking graph itself.
    assert set(report["breakdown_server"]["rank (ensemble, gRPC)"]) == {"rank", "item_lookup"}
    assert report["closed_loop_server"]["2"]["item_lookup"]["requests"] == 20
    assert report["breakdown_server"]["ranking (gRPC)"]["ranking"]["requests"] == 20
    assert "## Breakdown at 1 caller" in out.read_text() and "| client CPU cores |" in out.read_text()
