"""The all-native `rank` (the lookup graph merged into the ranking graph, export/lookup_graph.py) on the
real tritonserver with Triton's native onnxruntime backend, against the python backend's server on the
same requests; table versions published under load; bad requests; a restart with a bad newest version.
Nothing is mocked. The tests fail, never skip, where the backend is not built (the `native_backend`
fixture of conftest.py)."""

import shutil
import threading
import time

import numpy as np
import pytest
import tritonclient.grpc as grpc
from conftest import NUM_ITEMS, NUM_USERS

from common.errors import MMRankError
from export.repository import RenderConfig, render_repository
from export.table_publish import wait_served
from export.triton_launcher import TritonConfig, TritonServer
from mmrank.cli import main

OUTPUTS = ("scores", "candidate_known", "user_known", "item_table_version")


def _input(name, array):
    dtype = "FP32" if array.dtype == np.float32 else "INT64"
    t = grpc.InferInput(name, list(array.shape), dtype)
    t.set_data_from_numpy(array)
    return t


def _rank(client, hist, cands, user_id=None, user_feats=None, model="rank") -> dict:
    inputs = [_input("history_ids", hist), _input("candidate_ids", cands)]
    if user_id is not None:
        inputs.append(_input("user_id", user_id.reshape(-1, 1)))
    if user_feats is not None:
        inputs.append(_input("user_feats", user_feats))
    result = client.infer(model, inputs, client_timeout=120)
    return {name: result.as_numpy(name) for name in OUTPUTS}


@pytest.fixture(scope="module")
def clients(native_server, triton_server):
    return grpc.InferenceServerClient(native_server.grpc_url), grpc.InferenceServerClient(
        triton_server.grpc_url
    )


def _same(native: dict, python: dict) -> None:
    for name in ("candidate_known", "user_known", "item_table_version"):
        np.testing.assert_array_equal(native[name], python[name], err_msg=name)
    np.testing.assert_allclose(native["scores"], python["scores"], rtol=0, atol=1e-5)


def test_native_rank_has_no_python_step_and_answers_as_the_python_backend(clients):
    native, python = clients
    config = native.get_model_config("rank").config
    assert config.platform == "onnxruntime_onnx"  # ids in, scores out, in one native model
    assert not config.ensemble_scheduling.step and not native.is_model_ready("item_lookup")
    rng = np.random.default_rng(11)
    hist = rng.integers(-3, NUM_ITEMS + 9, (4, 9)).astype(np.int64)  # unknown, padding and negative ids
    cands = rng.integers(-3, NUM_ITEMS + 9, (4, 7)).astype(np.int64)
    users = np.array([1, NUM_USERS, NUM_USERS + 4, -1], np.int64)  # known and unknown users
    for user_id, user_feats in ((None, None), (users, None), (users, np.array([[2], [1], [7], [-1]]))):
        _same(
            _rank(native, hist, cands, user_id, user_feats), _rank(python, hist, cands, user_id, user_feats)
        )
    for b in range(4):  # one user per request, as the client sends them
        one = _rank(native, hist[b : b + 1], cands[b : b + 1], users[b : b + 1])
        _same(one, _rank(python, hist[b : b + 1], cands[b : b + 1], users[b : b + 1]))
    answer = _rank(native, hist, cands, users)
    assert answer["user_known"].tolist() == [[True], [True], [False], [False]]
    assert answer["item_table_version"].tolist() == [[1]] * 4


def test_bad_requests_get_an_answer_within_the_limits_or_a_clear_refusal(clients):
    """The native graph cannot raise: what each of the python backend's refused requests gets there."""
    native, python = clients
    hist, cands = np.arange(1, 7, dtype=np.int64)[None], np.arange(1, 6, dtype=np.int64)[None]
    empty = _rank(native, hist, np.zeros((1, 0), np.int64))  # python: INVALID_ARGUMENT, empty
    assert empty["scores"].shape == (1, 0) and empty["candidate_known"].shape == (1, 0)
    over = np.concatenate([np.ones((1, 2000), np.int64), cands], axis=1)  # the limit is 2,000
    answer = _rank(native, hist, over)
    assert np.isfinite(answer["scores"][0, :2000]).all() and answer["candidate_known"][0, :2000].all()
    assert np.isneginf(answer["scores"][0, 2000:]).all() and not answer["candidate_known"][0, 2000:].any()
    huge = _rank(native, hist, np.ones((1, 300_000), np.int64))
    assert huge["scores"].shape == (1, 300_000) and int(huge["candidate_known"].sum()) == 2000
    long = np.concatenate(
        [np.full((1, 13_000_000 - 1000), 5, np.int64), np.arange(1, 1001)[None] % 20 + 1], 1
    )
    recent = _rank(native, long, cands)  # a 104 MB message: the most recent 1,000 ids are read
    _same(recent, _rank(python, long[:, -1000:], cands))
    refused = {
        "'history_ids' data-type is 'FP32', but model 'rank' expects 'INT64'": (
            hist.astype(np.float32),
            cands,
            None,
        ),
        "unexpected shape for input 'user_feats'": (hist, cands, np.zeros((1, 5), np.int64)),
    }
    for message, (h, c, feats) in refused.items():
        with pytest.raises(grpc.InferenceServerException, match=message) as caught:
            _rank(native, h, c, user_feats=feats)
        assert caught.value.status() == "StatusCode.INVALID_ARGUMENT"
    # python: INVALID_ARGUMENT over max_batch_size; the native graph ranks the first max_batch_size rows
    limit = python.get_model_config("rank").config.max_batch_size
    hists, rows, users = (
        np.repeat(hist, limit + 2, 0),
        np.repeat(cands, limit + 2, 0),
        np.ones(limit + 2, np.int64),
    )
    with pytest.raises(grpc.InferenceServerException, match=f"must be <= {limit}"):
        _rank(python, hists, rows, users)
    batch = _rank(native, hists, rows, users)
    _same({k: v[:limit] for k, v in batch.items()}, _rank(python, hists[:limit], rows[:limit], users[:limit]))
    assert np.isneginf(batch["scores"][limit:]).all() and not batch["candidate_known"][limit:].any()
    assert not batch["user_known"][limit:].any() and (batch["item_table_version"] == 1).all()


@pytest.fixture
def own_server(native_backend, small_export, tmp_path):
    """A native server of this test's own (explicit model control), on a fresh repository."""
    repo = tmp_path / "repo"
    render_repository(small_export.out, repo, RenderConfig(backend="onnxruntime", max_batch_size=8))
    with TritonServer(TritonConfig(repo, control_mode="explicit")) as server:
        server.repo = repo
        yield server


def test_a_table_published_under_load_swaps_in_without_a_failed_call(own_server, tmp_path, capsys):
    new_id = NUM_ITEMS + 3
    items = tmp_path / "items.npz"
    np.savez(items, ids=np.array([new_id]), content=np.ones((1, 16), np.float32))
    hist, cands = np.array([[1, 2, 3]], np.int64), np.array([[new_id, 4, 5]], np.int64)
    seen, errors, stop = [], [], threading.Event()

    def caller():
        client = grpc.InferenceServerClient(own_server.grpc_url)
        while not stop.is_set():
            try:
                answer = _rank(client, hist, cands)
                seen.append((int(answer["item_table_version"][0, 0]), bool(answer["candidate_known"][0, 0])))
            except Exception as e:  # every failed call counts
                errors.append(e)

    threads = [threading.Thread(target=caller) for _ in range(3)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        args = ["table", "publish", "--repo", str(own_server.repo), "--items", str(items)]
        assert main([*args, "--url", own_server.grpc_url]) == 0
        published = len(seen)
        time.sleep(1.0)
    finally:
        stop.set()
        for t in threads:
            t.join()
    assert "answers with item table version 2" in capsys.readouterr().out
    assert errors == [] and len(seen) > published > 0
    assert (1, False) in seen and seen[-1] == (2, True)  # the new item is known from version 2 on
    assert set(seen) == {(1, False), (2, True)}
    assert own_server.supervisor.recoveries == []  # a version switch is no death


def test_a_restart_with_a_bad_newest_version_serves_the_newest_valid_one(own_server, tmp_path):
    model = own_server.repo / "rank"
    items = tmp_path / "items.npz"
    np.savez(items, ids=np.array([NUM_ITEMS + 1]), content=np.ones((1, 16), np.float32))
    assert main(["table", "publish", "--repo", str(own_server.repo), "--items", str(items)]) == 0
    shutil.copytree(model / "2", model / "3")  # a hand-made version: its graph answers version 2
    (model / "4").mkdir()  # and an unfinished copy
    own_server.stop()
    with TritonServer(TritonConfig(own_server.repo, control_mode="explicit")) as server:
        assert [line.split(":")[0] for line in server.skipped] == [
            "item table version 4 skipped",
            "item table version 3 skipped",
        ]
        client = grpc.InferenceServerClient(server.grpc_url)
        answer = _rank(client, np.array([[1, 2]], np.int64), np.array([[NUM_ITEMS + 1, 3]], np.int64))
        assert answer["item_table_version"].tolist() == [[2]] and answer["candidate_known"].all()
        index = {
            (m["name"], m.get("version")): m.get("state")
            for m in client.get_model_repository_index(as_json=True)["models"]
        }
        assert index[("rank", "2")] == "READY"  # only the version that serves shows READY
        assert ("rank", "3") not in index and ("rank", "4") not in index
        # a good version published later replaces it as usual
        assert (
            main(
                [
                    "table",
                    "publish",
                    "--repo",
                    str(own_server.repo),
                    "--items",
                    str(items),
                    "--url",
                    server.grpc_url,
                ]
            )
            == 0
        )
        assert _rank(client, np.array([[1]], np.int64), np.array([[3]], np.int64))[
            "item_table_version"
        ].tolist() == [[5]]
        with pytest.raises(MMRankError, match=r"version 6 after 1 s \(it answers with version 5\)$"):
            wait_served(server.grpc_url, "rank", 6, 3, 1.0)
