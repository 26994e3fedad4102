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
