"""The ranking client (sync, asyncio and `mmrank rank`, over gRPC and HTTP) against the real tritonserver.

The server is the session's python-backend repository of the small export (tests/export/conftest.py);
expected scores come from the PyTorch model itself, so the client is checked end to end. The server
tests run once per protocol.
"""

import asyncio
import json

import numpy as np
import pytest
from conftest import NUM_ITEMS, NUM_USERS
from rank_answer import rank_answer
from tritonclient.grpc import service_pb2 as pb

from clients.grpc_transport import infer_request, response_outputs
from clients.rank_protocol import OUTPUTS, checked
from clients.ranking_client import AsyncRankingClient, ClientConfig, RankingClient, RankingError
from export.parity import training_scores
from export.triton_launcher import free_port
from mmrank.cli import main


def _want(model, history, candidates, user_id=0):
    hist = np.zeros((1, max(len(history), 1)), np.int64)
    if history:
        hist[0, -len(history) :] = history
    cands = np.array([candidates], np.int64)
    feats = np.zeros((1, len(model.schema.user_feat_cards)), np.int64)
    return training_scores(model, hist, cands, np.array([user_id]), feats)[0]


def _url(server, protocol: str) -> str:
    return server.grpc_url if protocol == "grpc" else f"http://{server.http_url}"


@pytest.fixture(scope="module", params=["grpc", "http"])
def protocol(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def url(triton_server, protocol):
    return _url(triton_server, protocol)


def test_sync_client_scores_equal_the_model(small_export, url):
    with RankingClient(ClientConfig(url=url, timeout_s=30)) as client:
        assert client.ready()
        history, candidates = [3, 9, 4, 17], [1, 2, 5, 8, 13]
        ranking = client.rank(history, candidates)
        scores, known = ranking.scores, ranking.known
        assert scores.shape == (5,) and scores.dtype == np.float32 and known.all()
        np.testing.assert_allclose(scores, _want(small_export.model, history, candidates), atol=1e-5)
        assert ranking.item_table_version == 1 and not ranking.user_known  # no user_id: the unknown user
        with_user = client.rank(history, candidates, user_id=NUM_USERS)
        assert with_user.user_known
        np.testing.assert_allclose(
            with_user.scores, _want(small_export.model, history, candidates, NUM_USERS), atol=1e-5
        )
        stranger = client.rank(history, candidates, user_id=NUM_USERS + 1)
        assert not stranger.user_known  # scored as the unknown user
        np.testing.assert_allclose(stranger.scores, scores, atol=1e-6)


def test_unknown_candidates_are_flagged_and_ranked_last_or_raise(small_export, url):
    with RankingClient(ClientConfig(url=url, timeout_s=30)) as client:
        scores, known, _, _ = client.rank([3, 9], [2, 99_999, 5])
    assert known.tolist() == [True, False, True] and scores[1] == -np.inf
    np.testing.assert_allclose(scores[[0, 2]], _want(small_export.model, [3, 9], [2, 5]), atol=1e-5)
    strict = ClientConfig(url=url, timeout_s=30, unknown_ids="raise")
    with (
        RankingClient(strict) as client,
        pytest.raises(RankingError, match=r"not in the item table: \[99999\]"),
    ):
        client.rank([3, 9], [2, 99_999, 5])


def test_empty_history_is_the_padding_history(small_export, url):
    with RankingClient(ClientConfig(url=url, timeout_s=30)) as client:
        scores = client.rank([], [4, 6]).scores
    np.testing.assert_allclose(scores, _want(small_export.model, [], [4, 6]), atol=1e-5)


def test_async_client_matches_the_sync_client(url):
    history, candidates = [1, 2, 3], [7, NUM_ITEMS, 11]
    with RankingClient(ClientConfig(url=url, timeout_s=30)) as client:
        want = client.rank(history, candidates).scores

    async def many():
        async with AsyncRankingClient(ClientConfig(url=url, timeout_s=30)) as client:
            return await asyncio.gather(*(client.rank(history, candidates) for _ in range(4)))

    for got in asyncio.run(many()):
        np.testing.assert_allclose(got.scores, want, atol=1e-6)


@pytest.mark.parametrize(
    ("history", "candidates", "message"),
    [
        ([1, 2], [], "candidate_ids is empty"),
        ([[1, 2]], [3], "history_ids must be a flat list"),
        ([1], [1.5], "candidate_ids must hold integer item ids"),
    ],
)
def test_bad_ids_are_refused_before_any_call(history, candidates, message):
    down = f"127.0.0.1:{free_port()}"  # nothing listens there: any call would say "unavailable"
    with RankingClient(ClientConfig(url=down)) as client, pytest.raises(RankingError, match=message):
        client.rank(history, candidates)


def test_unknown_model_names_the_model(url):
    with RankingClient(ClientConfig(url=url, model="no_such_model")) as client:
        with pytest.raises(RankingError, match="no_such_model"):
            client.rank([1], [2])


def test_native_rank_answers_the_client_as_the_python_backend(native_server, url, protocol):
    """The native `rank` takes no batching from Triton (its graph reads the batch axis itself): the client
    sends the same [1, ...] request to it and reads the same answer."""
    history, candidates = [3, -9, 4, 17, NUM_ITEMS + 3], [1, NUM_ITEMS + 7, 5, 8]
    with (
        RankingClient(ClientConfig(url=_url(native_server, protocol), timeout_s=30)) as native,
        RankingClient(ClientConfig(url=url, timeout_s=30)) as python,
    ):
        for user_id in (None, NUM_USERS, NUM_USERS + 2):
            got, want = native.rank(history, candidates, user_id), python.rank(history, candidates, user_id)
            np.testing.assert_allclose(got.scores, want.scores, rtol=0, atol=1e-5)
            assert got.known.tolist() == want.known.tolist() == [True, False, True, True]
            assert got[2:] == want[2:]


def _response(outputs: dict[str, tuple[str, np.ndarray]]) -> pb.ModelInferResponse:
    response = pb.ModelInferResponse(model_name="rank")
    for name, (datatype, array) in outputs.items():
        response.outputs.add(name=name, datatype=datatype, shape=array.shape)
        response.raw_output_contents.append(array.tobytes())
    return response


def test_requests_carry_the_ids_as_raw_int64_in_the_model_shape():
    tensors = checked([], [5, -2, 9], 4)  # an empty history is one padding id
    for batched, lead in ((True, [1]), (False, [])):
        request = infer_request("rank", tensors, batched)
        assert [(t.name, t.datatype, list(t.shape)) for t in request.inputs] == [
            ("history_ids", "INT64", [*lead, 1]),
            ("candidate_ids", "INT64", [*lead, 3]),
            ("user_id", "INT64", [*lead, 1]),
        ]
        sent = [np.frombuffer(raw, np.int64).tolist() for raw in request.raw_input_contents]
        assert sent == [[0], [5, -2, 9], [4]]
        assert [o.name for o in request.outputs] == list(OUTPUTS)


def test_response_outputs_are_read_as_writable_arrays():
    out = response_outputs(_response(rank_answer()), "rank")
    assert out["scores"].tolist() == [0, 1, 2] and out["item_table_version"].tolist() == [7]
    assert out["candidate_known"].dtype == bool and out["scores"].flags.writeable


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"scores": ("FP64", np.zeros((1, 3)))}, "output 'scores' of 'rank' is FP64, expected FP32"),
        ({"user_known": None}, r"has no \['user_known'\] output"),
        ({"scores": ("FP32", np.zeros(2, np.float32)), "shape": (1, 3)}, "8 bytes for shape \\[1, 3\\]"),
        ({"extra": ("FP32", np.zeros(1, np.float32)), "drop_buffer": True}, "4 output buffers for 5 outputs"),
    ],
)
def test_a_malformed_response_is_named(change, message):
    outputs = rank_answer()
    shape = change.pop("shape", None)
    drop = change.pop("drop_buffer", False)
    for name, value in change.items():
        if value is None:
            del outputs[name]
        else:
            outputs[name] = value
    response = _response(outputs)
    if shape is not None:
        response.outputs[0].shape[:] = shape
    if drop:
        del response.raw_output_contents[-1]
    with pytest.raises(RankingError, match=message):
        response_outputs(response, "rank")


@pytest.mark.parametrize("scheme", ["", "grpc://", "http://"])
def test_the_async_client_names_a_down_server(scheme):
    url = f"{scheme}127.0.0.1:{free_port()}"

    async def call():
        async with AsyncRankingClient(ClientConfig(url=url, timeout_s=2, retries=1, backoff_s=0.01)) as c:
            await c.rank([1], [2])

    with pytest.raises(RankingError, match=f"Triton at {url} is unavailable"):
        asyncio.run(call())


@pytest.mark.parametrize("scheme", ["", "grpc://", "http://"])
def test_server_down_is_retried_then_named(scheme):
    url = f"{scheme}127.0.0.1:{free_port()}"  # nothing listens there
    with RankingClient(ClientConfig(url=url, timeout_s=2, retries=2, backoff_s=0.01)) as client:
        assert not client.ready()
        with pytest.raises(RankingError, match=f"Triton at {url} is unavailable"):
            client.rank([1], [2])


def test_rank_command_prints_candidates_best_first(small_export, url, capsys):
    code = main(["rank", "--url", url, "--history", "3,9,4", "--candidates", "1,2,5", "--timeout", "30"])
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    want = dict(zip([1, 2, 5], _want(small_export.model, [3, 9, 4], [1, 2, 5]).tolist(), strict=True))
    ranked = out["ranked"]
    assert sorted(r["item_id"] for r in ranked) == [1, 2, 5] and all(r["known"] for r in ranked)
    # Near-tied scores may swap between the server's graph and PyTorch, so the order is checked against
    # the printed scores, and those against PyTorch.
    printed = [r["score"] for r in ranked]
    assert printed == sorted(printed, reverse=True)
    np.testing.assert_allclose(printed, [want[r["item_id"]] for r in ranked], atol=1e-5)
    assert out["item_table_version"] == 1 and out["user_known"] is False


def test_rank_command_notes_an_unknown_user(url, capsys):
    args = ["rank", "--url", url, "--history", "3,9", "--candidates", "1,2", "--timeout", "30"]
    assert main([*args, "--user", str(NUM_USERS + 5)]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["user_known"] is False
    note = f"note: user {NUM_USERS + 5} is not a user the model knows: ranked as the unknown user"
    assert note in captured.err
    assert main([*args, "--user", "1"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["user_known"] is True and captured.err == ""


def test_rank_command_takes_negative_ids_and_the_server_flags_them_unknown(small_export, url, capsys):
    argv = ["rank", "--url", url, "--history", "-3,9", "--candidates", "-1,2", "--timeout", "30"]
    assert main(argv) == 0
    ranked = json.loads(capsys.readouterr().out)["ranked"]
    assert [(r["item_id"], r["known"]) for r in ranked] == [(2, True), (-1, False)] and ranked[1][
        "score"
    ] is None
    # The unknown history id is dropped, as the lookup drops every id the table does not hold.
    np.testing.assert_allclose(ranked[0]["score"], _want(small_export.model, [9], [2])[0], atol=1e-5)


def test_rank_command_against_a_down_server_fails_with_one_line(capsys):
    url = f"127.0.0.1:{free_port()}"
    assert main(["rank", "--url", url, "--history", "1", "--candidates", "2", "--timeout", "1"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "unavailable" in err[0]
