"""`mmrank loadtest`: a short locust run against the real tritonserver, and its input checks.

The smoke run serves the small export of conftest.py and draws requests from a synthetic dataset with
the same item and user counts, so every id is one the item table holds.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from clients import loadtest
from clients.loadtest import (
    LoadTestConfig,
    check_loopback,
    failures,
    percentiles,
    run_loadtest,
    staging_folder,
    summarise,
)
from clients.request_sample import SampleConfig, draw_requests
from common.errors import MMRankError
from export.triton_launcher import free_port
from mmrank.cli import main

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


@pytest.mark.parametrize("protocol", ["gRPC", "HTTP"])
def test_locust_smoke_run_has_no_failures_and_writes_every_report(
    triton_server, tiny_data, tmp_path, protocol
):
    url = triton_server.grpc_url if protocol == "gRPC" else f"http://{triton_server.http_url}"
    cfg = LoadTestConfig(
        url=url,
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
    assert not (tmp_path.parent / f".{tmp_path.name}.partial").exists()
    assert f"(locust over {protocol})" in (tmp_path / "summary.md").read_text()


def test_requests_have_n_candidates_and_l_history_ids_of_real_test_requests(small_export, tiny_data):
    schema = small_export.model.schema
    sample = draw_requests(tiny_data, SampleConfig(candidates=20, history=5, requests=10, seed=3))
    assert sample.histories.shape == (len(sample), 5) and sample.candidates.shape == (len(sample), 20)
    assert 0 < len(sample) <= 10
    assert sample.histories.min() >= 1 and sample.candidates.max() <= schema.num_items
    assert sample.users.min() >= 1 and sample.users.max() <= schema.num_users
    again = draw_requests(tiny_data, SampleConfig(candidates=20, history=5, requests=10, seed=3))
    np.testing.assert_array_equal(sample.candidates, again.candidates)


def test_summary_counts_each_step_at_its_user_count_and_takes_nearest_rank_percentiles():
    calls = {
        "step": np.array([0] * 100 + [1] * 6),
        "users": np.array([1] * 100 + [1, 1] + [2] * 4),  # step 1 starts with 2 calls at the old count
        "start_s": np.concatenate([np.linspace(0, 1.9, 100), [2.0, 2.5, 3.0, 3.2, 3.4, 3.6]]),
        "latency_ms": np.concatenate([np.arange(1, 101, dtype=float), [9.0, 9.0, 5.0, 6.0, 7.0, 5000.0]]),
        "ok": np.array([1] * 100 + [0, 1] + [1, 1, 1, 0]),
        "candidates": np.full(106, 10),
    }
    cfg = LoadTestConfig(user_steps=(1, 2), duration_s=2.0)
    steps = summarise(calls, cfg)
    assert [s["requests"] for s in steps] == [100, 4]
    assert [s["failures"] for s in steps] == [0, 1]
    assert [(s["ramp_calls"], s["ramp_failures"]) for s in steps] == [(0, 0), (2, 1)]
    assert (steps[0]["p50_ms"], steps[0]["p95_ms"], steps[0]["p99_ms"]) == (50.0, 95.0, 99.0)
    assert steps[1]["p99_ms"] == 5000.0  # a failed call's time counts
    # 3 successful calls from the first call at 2 users (3.0 s) to the end of the step (4.0 s)
    assert steps[1]["window_s"] == pytest.approx(1.0)
    assert steps[1]["requests_per_s"] == pytest.approx(3.0) and steps[1]["candidates_per_s"] == pytest.approx(
        30.0
    )
    assert failures({"steps": steps}) == 2
    assert np.isnan(percentiles(np.array([]))["p50_ms"])
    with pytest.raises(MMRankError, match=r"step 2 \(4 users\): no call ran at that user count"):
        summarise(calls, LoadTestConfig(user_steps=(1, 2, 4), duration_s=2.0))


@pytest.mark.parametrize(
    "url",
    [
        "10.1.2.3:8001",
        "8.8.8.8:8001",
        "127.0.0.1",
        "host:port",
        "http://10.1.2.3:8000",
        "https://127.0.0.1:8000",
    ],
)
def test_non_loopback_or_malformed_addresses_are_refused(url):
    with pytest.raises(MMRankError, match="loopback|HOST:PORT|TLS"):
        check_loopback(url)


def test_loopback_addresses_pass():
    assert check_loopback("127.0.0.1:8001") == ("127.0.0.1", 8001)
    assert check_loopback("localhost:1")[1] == 1
    assert (
        check_loopback("http://127.0.0.1:8000")
        == check_loopback("http://127.0.0.1:8000/")
        == ("127.0.0.1", 8000)
    )
    assert check_loopback("grpc://[::1]:8001") == ("::1", 8001)


def test_cli_says_in_one_line_what_is_wrong(tmp_path, capsys):
    assert main(["loadtest", "--url", "10.0.0.1:8001", "--out", str(tmp_path), "--data", "x"]) == 1
    assert "10.0.0.1 is not a loopback address" in capsys.readouterr().err
    port = free_port()
    assert main(["loadtest", "--url", f"127.0.0.1:{port}", "--out", str(tmp_path), "--data", "x"]) == 1
    err = capsys.readouterr().err.strip()
    assert "no ready model 'rank'" in err and len(err.splitlines()) == 1
    with pytest.raises(MMRankError, match="not a dataset folder"):
        draw_requests(tmp_path / "missing")
    assert main(["loadtest", "--users", "1,a", "--out", str(tmp_path)]) == 1
    assert "--users '1,a': expected comma-separated user counts >= 1" in capsys.readouterr().err
    assert main(["loadtest", "--duration", "0.5", "--out", str(tmp_path)]) == 1
    assert "a duration >= 2 s" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    with pytest.raises(MMRankError, match="exists and is not a folder"):
        staging_folder(tmp_path / "file")


def test_a_failed_run_leaves_the_earlier_reports_whole(triton_server, tiny_data, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    earlier = {name: f"earlier {name}" for name in ("calls.csv", "summary.json", "locust.log")}
    for name, text in earlier.items():
        (out / name).write_text(text)
    broken = tmp_path / "broken_locustfile.py"
    broken.write_text("raise SystemExit(3)\n")
    monkeypatch.setattr(loadtest, "LOCUSTFILE", broken)
    sample = SampleConfig(candidates=20, history=5, requests=10)
    cfg = LoadTestConfig(url=triton_server.grpc_url, user_steps=(1,), duration_s=2.0, sample=sample)
    with pytest.raises(MMRankError, match="locust exited 3 without its calls"):
        run_loadtest(out, tiny_data, cfg)
    assert {p.name: p.read_text() for p in out.iterdir()} == earlier


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


@pytest.fixture
def latency_bench(monkeypatch):
    """benchmarks/serving_latency.py as a module."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "benchmarks" / "serving_latency.py"
    spec = importlib.util.spec_from_file_location("serving_latency", path)
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, bench)  # dataclasses look their module up there
    spec.loader.exec_module(bench)
    return bench


def test_latency_benchmark_checks_its_inputs_before_measuring(triton_server, tmp_path, capsys, latency_bench):
    out = tmp_path / "new" / "latency.md"
    metrics = ["--metrics-url", f"127.0.0.1:{triton_server.metrics_port}"]
    args = [*metrics, "--data", str(tmp_path / "no data"), "--out", str(out)]
    served = ["--url", triton_server.grpc_url, "--repo", str(triton_server.repo)]
    cases = [
        (["--url", triton_server.grpc_url, "--repo", str(tmp_path)], "ONNX graph not found"),
        ([*served, "--concurrency", "1,x"], "--concurrency '1,x': expected comma-separated"),
        (["--url", f"127.0.0.1:{free_port()}", "--repo", str(triton_server.repo)], "no ready model 'rank'"),
        (served, "not a dataset folder"),
    ]
    for given, message in cases:
        assert latency_bench.main([*given, *args]) == 1
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
    assert not out.exists()


def test_latency_benchmark_runs_against_the_real_server(triton_server, tiny_data, tmp_path, latency_bench):
    bench = latency_bench
    out = tmp_path / "latency.md"
    args = ["--url", triton_server.grpc_url, "--metrics-url", f"127.0.0.1:{triton_server.metrics_port}"]
    args += ["--repo", str(triton_server.repo), "--data", str(tiny_data), "--out", str(out)]
    args += ["--concurrency", "1,2", "--calls", "20", "--warmup", "2", "--candidates", "20", "--history", "5"]
    assert bench.main(args) == 0
    report = json.loads(out.with_suffix(".json").read_text())
    assert all(r["failures"] == 0 and r["calls"] == 20 for r in report["closed_loop"].values())
    assert all(r["client_cores"] > 0 for r in report["closed_loop"].values())
    # The python backend's rank is one step: item_lookup runs the ranking graph itself.
    assert set(report["breakdown_server"]["rank (gRPC)"]) == {"rank", "item_lookup"}
    assert report["closed_loop_server"]["2"]["item_lookup"]["requests"] == 20
    assert report["breakdown_server"]["ranking (gRPC)"]["ranking"]["requests"] == 20
    assert "## Breakdown at 1 caller" in out.read_text() and "| client CPU cores |" in out.read_text()
