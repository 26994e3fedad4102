"""The real tritonserver (from nvidia-pytriton) on a rendered python-backend repository, over gRPC.

Nothing is mocked: the server loads the rendered models, runs the ONNX graphs with onnxruntime inside
the Python backend and answers tritonclient calls on loopback. A server that cannot start here fails
these tests with the reason (conftest.py `tritonserver`).
"""

import io
import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpc
from conftest import NUM_ITEMS, NUM_USERS, TEXT_FIELDS

from export.manifest import Manifest
from export.parity import training_scores
from export.repository import add_table_version
from export.triton_launcher import NO_CUDA_ERRORS, cuda_driver, error_lines
from model_repository import item_table as it
from model_repository.ort_graph import OrtGraph


@pytest.fixture(scope="module")
def server(triton_server):
    return triton_server


@pytest.fixture(scope="module")
def client(server):
    return grpc.InferenceServerClient(server.grpc_url)


def _input(name, array, dtype):
    t = grpc.InferInput(name, list(array.shape), dtype)
    t.set_data_from_numpy(array)
    return t


def _infer(client, hist, cands, user_id=None, user_feats=None):
    inputs = [_input("history_ids", hist, "INT64"), _input("candidate_ids", cands, "INT64")]
    if user_id is not None:
        inputs.append(_input("user_id", user_id.reshape(-1, 1), "INT64"))
    if user_feats is not None:
        inputs.append(_input("user_feats", user_feats, "INT64"))
    return client.infer("rank", inputs, client_timeout=30)


def _rank(client, hist, cands, user_id=None, user_feats=None):
    result = _infer(client, hist, cands, user_id, user_feats)
    return result.as_numpy("scores"), result.as_numpy("candidate_known")


def test_every_response_says_whether_the_user_is_known_and_which_table_answered(client):
    hist, cands = np.array([[1, 2]] * 4), np.array([[3, 4]] * 4)
    result = _infer(client, hist, cands, np.array([1, NUM_USERS, NUM_USERS + 1, -2]))
    assert result.as_numpy("user_known").tolist() == [[True], [True], [False], [False]]
    assert result.as_numpy("item_table_version").tolist() == [[1]] * 4
    anonymous = _infer(client, hist[:1], cands[:1])  # no user_id: scored as the unknown user
    assert anonymous.as_numpy("user_known").tolist() == [[False]]


def test_rank_ensemble_scores_equal_the_pytorch_model(small_export, client):
    rng = np.random.default_rng(0)
    hist = np.array([[0, 0, 3, 9, 4, 17], [5, 6, 7, 8, 1, 2]], np.int64)
    cands = rng.integers(1, NUM_ITEMS + 1, (2, 7)).astype(np.int64)
    users, feats = np.array([2, NUM_USERS], np.int64), np.array([[1], [2]], np.int64)
    scores, known = _rank(client, hist, cands, users, feats)
    assert scores.shape == (2, 7) and scores.dtype == np.float32 and known.all()
    np.testing.assert_allclose(
        scores, training_scores(small_export.model, hist, cands, users, feats), atol=1e-5
    )
    for b in range(2):  # one user per request: [L] and [N] with a batch of one
        one, _ = _rank(client, hist[b : b + 1], cands[b : b + 1], users[b : b + 1], feats[b : b + 1])
        np.testing.assert_allclose(one, scores[b : b + 1], atol=1e-5)


def test_optional_user_inputs_and_unknown_ids(small_export, client):
    hist = np.array([[4, 12345, 7]], np.int64)  # an unknown history item is dropped
    cands = np.array([[1, 99999, 3]], np.int64)
    scores, known = _rank(client, hist, cands)
    assert known.tolist() == [[True, False, True]] and scores[0, 1] == -np.inf  # ranked last
    zeros = np.zeros(1, np.int64)
    want = training_scores(
        small_export.model, np.array([[4, 7]]), np.array([[1, 3]]), zeros, np.zeros((1, 1), np.int64)
    )
    np.testing.assert_allclose(scores[:, [0, 2]], want, atol=1e-5)


def test_concurrent_requests_of_different_sizes(small_export, server):
    rng = np.random.default_rng(1)
    jobs = []
    for n in (1, 3, 3, 8, 5, 3, 2, 8):
        hist = rng.integers(0, NUM_ITEMS + 1, (1, 6)).astype(np.int64)
        hist[:, :2] = 0
        jobs.append(
            (hist, rng.integers(1, NUM_ITEMS + 1, (1, n)).astype(np.int64), np.array([1]), np.array([[2]]))
        )

    def call(job):
        return _rank(grpc.InferenceServerClient(server.grpc_url), *job)[0]

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(call, jobs))
    for job, scores in zip(jobs, results, strict=True):
        np.testing.assert_allclose(scores, training_scores(small_export.model, *job), atol=1e-5)


def test_bad_request_names_the_problem(client):
    with pytest.raises(
        grpc.InferenceServerException,
        match="'history_ids' data-type is 'FP32', but model 'rank' expects 'INT64'",
    ):
        client.infer(
            "rank",
            [
                _input("history_ids", np.zeros((1, 3), np.float32), "FP32"),
                _input("candidate_ids", np.ones((1, 2), np.int64), "INT64"),
            ],
        )
    with pytest.raises(grpc.InferenceServerException, match=r"missing required input\(s\) \['history_ids'\]"):
        client.infer("rank", [_input("candidate_ids", np.ones((1, 2), np.int64), "INT64")])


def _refused(client, hist, cands, feats=None):
    """The error message of a `rank` call the server must refuse with INVALID_ARGUMENT."""
    with pytest.raises(grpc.InferenceServerException) as caught:
        _rank(client, hist, cands, user_feats=feats)
    assert caught.value.status() == "StatusCode.INVALID_ARGUMENT", caught.value
    return caught.value.message()


def test_oversize_and_empty_requests_are_refused_before_any_graph_runs(client):
    ok = np.array([[1, 2]], np.int64)
    # The repository of conftest.py is rendered with the default limits (2000 candidates, 1000 history).
    assert "candidate_ids is empty: send 1 to 2000" in _refused(client, ok, np.zeros((1, 0), np.int64))
    many = np.ones((1, 2001), np.int64)
    assert "candidate_ids has 2001 candidates per user, over the limit of 2000" in _refused(client, ok, many)
    long = np.ones((1, 1001), np.int64)
    assert "history_ids has 1001 ids per user, over the limit of 1000" in _refused(client, long, ok)
    wide = np.zeros((1, 2), np.int64)  # the model has one user feature
    assert "user_feats" in _refused(client, ok, ok, wide)


def test_a_history_longer_than_the_model_keeps_its_most_recent_items(small_export, client):
    rng = np.random.default_rng(4)
    hist = rng.integers(1, NUM_ITEMS + 1, (1, 40)).astype(np.int64)  # the model reads L = 6
    cands = np.array([[1, 2, 3]], np.int64)
    scores, _ = _rank(client, hist, cands)
    recent, _ = _rank(client, hist[:, -6:], cands)
    np.testing.assert_allclose(scores, recent, atol=1e-6)


def _png(seed: int) -> bytes:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (180, 120, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def test_encode_items_equals_encoders_and_fusion_in_pytorch(small_export, client):
    from trainer.features.image import ImageEncoder, load_image

    texts = np.array([["Toy Story", "A cowboy doll feels threatened."], ["Heat", ""]], dtype=object)
    images = np.array([[_png(0)], [b""]], dtype=object)
    result = client.infer("encode_items", [_input("text", texts, "BYTES"), _input("image", images, "BYTES")])
    content = result.as_numpy("content")

    text_encoder, tower = small_export.config.text_encoder, small_export.model.tower
    text_feats = torch.zeros(2, len(TEXT_FIELDS), 384)
    text_mask = torch.zeros(2, len(TEXT_FIELDS), dtype=torch.bool)
    with torch.inference_mode():
        for i, row in enumerate(texts):
            for k, text in enumerate(row):
                if text:
                    text_feats[i, k] = text_encoder(*text_encoder.tokenize([text], 24))[0]
                    text_mask[i, k] = True
        image_feats = torch.zeros(2, 1, 1280)
        image_feats[0, 0] = ImageEncoder().eval()(load_image(images[0, 0])[None])[0]
        image_mask = torch.tensor([[True], [False]])
        want = tower.fuse({"text": (text_feats, text_mask), "image": (image_feats, image_mask)}).numpy()
    np.testing.assert_allclose(content, want, atol=1e-4)


def test_new_item_table_version_loads_without_restart(small_export, server, client):
    manifest = Manifest.read(small_export.out)
    new_id = NUM_ITEMS + 5
    vector = np.random.default_rng(3).standard_normal((1, manifest.model.d)).astype(np.float32)
    table = it.ItemTable.read(small_export.out / "item_table").with_items(np.array([new_id]), vector, 2)
    version = add_table_version(server.repo, table)
    try:
        _check_new_version_is_served(small_export, server, client, table, new_id)
    finally:  # the server is the session's: later tests (test_torch_serving.py) expect version 1
        shutil.rmtree(version)
        client.load_model("item_lookup")
    assert client.is_model_ready("item_lookup", "1") and not client.is_model_ready("item_lookup", "2")
    assert server.supervisor.recoveries == []  # the stubs the server stopped itself were no deaths


def _check_new_version_is_served(small_export, server, client, table, new_id):
    pid = server.process.pid
    client.load_model("item_lookup")
    assert client.is_model_ready("item_lookup", "2") and not client.is_model_ready("item_lookup", "1")
    hist, cands = np.array([[1, 2, 3]], np.int64), np.array([[new_id, 4]], np.int64)
    scores, known = _rank(client, hist, cands)
    assert known.tolist() == [[True, True]] and server.process.pid == pid
    assert _infer(client, hist, cands).as_numpy("item_table_version").tolist() == [[2]]
    manifest = Manifest.read(small_export.out)
    feeds = it.rank_inputs(table, manifest.model.lookup(), hist, cands)
    ranking = OrtGraph(small_export.out / manifest.graph("ranking").file)
    want = ranking.run({t.name: feeds[t.name] for t in manifest.graph("ranking").inputs})["scores"]
    np.testing.assert_allclose(scores, want, atol=1e-5)


def test_a_healthy_load_logs_no_error_but_the_explained_cuda_lines(server):
    """Every model of the repository loaded: the log holds no E-level line, but on a host without a CUDA
    driver the two kinds the launcher explains (export/triton_launcher.py), and there neither the
    pinned-memory warning nor the NVML error of the GPU metrics (both switched off)."""
    log = server.log_at_ready
    assert error_lines(log) == []
    if not cuda_driver():
        errors = [line for line in log.splitlines() if line.startswith("E")]
        assert errors and all(any(known in e for known in NO_CUDA_ERRORS) for e in errors)
        assert "pinned memory pool will not be available" not in log and "NVML" not in log
