"""The torch serving backend: exported ranking programs, the runtime's TorchRanker, and a real
tritonserver serving `mmrank repo --backend torch` next to the python backend's scores.

On this CPU machine the program runs on the CPU inside the Python backend (the default `device=auto`);
the CUDA-graph test runs where torch sees a GPU (`make gpu-check`, which runs this file's in-process
tests: a GPU host may have no tritonclient, so the repository and server tests import it late).
"""

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpc
from conftest import NUM_ITEMS, make_model

from common.errors import MMRankError
from export.manifest import Manifest
from export.onnx_graphs import ExportConfig, export_model
from model_repository import item_table as it
from model_repository.ort_graph import OrtGraph
from model_repository.torch_ranker import Bucket, TorchRanker, choose_device, pad_to, pick_bucket


def _export(tmp_path, **overrides):
    model = make_model(**overrides)
    out = tmp_path / "export"
    export_model(
        model, out, {"path": "-", "sha256": "0" * 64}, None, ExportConfig(progress=False, ranking_only=True)
    )
    manifest = Manifest.read(out)
    return out, manifest, it.ItemTable.read(out / "item_table"), manifest.model.lookup()


def _requests(rng, rows=3, length=9, n=7):
    """Histories and candidates with unknown ids (40+), padding (0) and an empty history row."""
    hist = rng.integers(0, NUM_ITEMS + 10, (rows, length))
    hist[0] = 0
    return hist, rng.integers(1, NUM_ITEMS + 10, (rows, n))


@pytest.mark.slow  # torch.export of two models
@pytest.mark.parametrize("overrides", [{}, {"interest.long_len": 12}], ids=["short_history", "long_history"])
def test_torch_programs_score_like_the_onnx_graph(tmp_path, overrides):
    torch.set_num_threads(1)
    out, manifest, table, lookup = _export(tmp_path, **overrides)
    program = manifest.programs["ranking"]
    assert program.inputs == [t.name for t in manifest.graph("ranking").inputs]
    graph = OrtGraph(out / manifest.graph("ranking").file)
    rng = np.random.default_rng(0)
    for buckets in ("", "1x4,4x8,8x64"):  # eager at the request's shape, then padded to a bucket
        for file, atol in ((program.file, 1e-5), (program.fp16_file, 2e-2)):
            ranker = TorchRanker(
                out / file, program.inputs, table, lookup, torch.device("cpu"), Bucket.parse(buckets)
            )
            for rows, n in ((1, 1), (3, 7), (5, 70)):  # 5 x 70 fits no bucket: eager
                hist, cands = _requests(rng, rows=rows, n=n)
                want = graph.run(it.rank_inputs(table, lookup, hist, cands))["scores"]
                scores, known, user_known = ranker.score(hist, cands)
                assert not user_known.any()  # no user_id sent: the unknown user
                assert scores.dtype == torch.float32 and scores.shape == (rows, n)
                assert known.tolist() == np.isfinite(want).tolist()  # unknown: -inf in both
                np.testing.assert_allclose(scores.numpy()[known], want[known], atol=atol, rtol=atol)
                assert (scores.numpy()[~known] == -np.inf).all()


def test_buckets_parse_pick_and_pad():
    buckets = Bucket.parse("8x512, 1x128,1x2048,1x128")
    assert buckets == [Bucket(1, 128), Bucket(1, 2048), Bucket(8, 512)]  # sorted by size, deduplicated
    assert pick_bucket(buckets, 1, 100) == Bucket(1, 128)
    assert pick_bucket(buckets, 2, 100) == Bucket(8, 512)
    assert pick_bucket(buckets, 1, 600) == Bucket(1, 2048)
    assert pick_bucket(buckets, 9, 10) is None and pick_bucket([], 1, 1) is None
    for bad in ("8", "0x5", "ax4"):
        with pytest.raises(MMRankError, match="buckets"):
            Bucket.parse(bad)
    padded = pad_to(
        {it.CANDIDATE_KNOWN: np.ones((1, 2), bool), it.HISTORY_MASK: np.ones((1, 3), bool)}, Bucket(2, 4)
    )
    assert padded[it.CANDIDATE_KNOWN].tolist() == [[True, True, False, False], [False] * 4]
    assert padded[it.HISTORY_MASK].tolist() == [[True] * 3, [False] * 3]  # history axis untouched


def test_device_choice_and_missing_programs(tmp_path):
    assert choose_device("cpu") == torch.device("cpu")
    if not torch.cuda.is_available():
        assert choose_device("auto") == torch.device("cpu")
        with pytest.raises(MMRankError, match="torch sees no CUDA device"):
            choose_device("cuda")
    with pytest.raises(MMRankError, match="expected auto, cuda or cpu"):
        choose_device("gpu")
    table = it.ItemTable(np.arange(3), np.zeros((3, 2), np.float32), None)
    lookup = it.LookupConfig(2, 0, 1, [])
    with pytest.raises(MMRankError, match="torch program not found"):
        TorchRanker(tmp_path / "none.pt2", [], table, lookup, torch.device("cpu"))
    (tmp_path / "bad.pt2").write_bytes(b"not a zip")
    with pytest.raises(MMRankError, match="cannot load the program"):
        TorchRanker(tmp_path / "bad.pt2", [], table, lookup, torch.device("cpu"))


def test_torch_repository_layout(small_export, tmp_path):
    from export.repository import RANKING_PROGRAM, RenderConfig, add_table_version, render_repository

    models = render_repository(
        small_export.out, tmp_path / "repo", RenderConfig(backend="torch", precision="fp16", buckets="1x8")
    )
    params = {k: v.string_value for k, v in models["item_lookup"].parameters.items()}
    assert params["program"] == RANKING_PROGRAM and params["buckets"] == "1x8" and "graph" not in params
    assert [s.model_name for s in models["rank"].ensemble_scheduling.step] == ["item_lookup"]
    version = tmp_path / "repo" / "item_lookup" / "1"
    manifest = Manifest.read(small_export.out)
    assert (version / RANKING_PROGRAM).read_bytes() == (
        small_export.out / manifest.programs["ranking"].fp16_file
    ).read_bytes()
    assert not (version / "ranking.onnx").exists()
    table = it.ItemTable.read(version / "item_table")
    assert (add_table_version(tmp_path / "repo", table) / RANKING_PROGRAM).is_file()


def test_an_export_without_programs_cannot_render_torch(small_export, tmp_path):
    import shutil

    from export.repository import RenderConfig, render_repository

    export = tmp_path / "export"
    shutil.copytree(small_export.out, export)
    manifest = Manifest.read(export)
    manifest.programs = {}
    manifest.write(export)
    with pytest.raises(MMRankError, match="no torch program of the ranking graph"):
        render_repository(export, tmp_path / "repo", RenderConfig(backend="torch"))
    for bad, message in (
        (RenderConfig(backend="torch", buckets="1x"), "buckets"),
        (RenderConfig(backend="torch", device="gpu"), "expected auto, cuda or cpu"),
    ):
        with pytest.raises(MMRankError, match=message):
            render_repository(small_export.out, tmp_path / "bad", bad)
    assert not (tmp_path / "bad").exists()


def _rank(client, hist, cands):
    import tritonclient.grpc as grpc

    inputs = []
    for name, array in (("history_ids", hist), ("candidate_ids", cands)):
        t = grpc.InferInput(name, list(array.shape), "INT64")
        t.set_data_from_numpy(array.astype(np.int64))
        inputs.append(t)
    result = client.infer("rank", inputs, client_timeout=60)
    names = ("scores", "candidate_known", "user_known", "item_table_version")
    return tuple(result.as_numpy(name) for name in names)


@pytest.mark.parametrize("dlpack_only", [False, True], ids=["numpy1_stub", "numpy2_stub"])
def test_torch_backend_serves_the_python_backends_scores(
    tritonserver, small_export, triton_server, tmp_path, dlpack_only
):
    """A real server on the torch repository (fp32, one bucket, so both the padded and the eager path
    answer) against the python repository's server: same scores, same flags, same bad-request answers."""
    from export.repository import RenderConfig, add_table_version, render_repository
    from export.triton_launcher import TritonConfig, TritonServer

    repo = tmp_path / "torch_repo"
    render_repository(small_export.out, repo, RenderConfig(backend="torch", max_batch_size=8, buckets="1x8"))
    rng = np.random.default_rng(3)
    reference = grpc.InferenceServerClient(triton_server.grpc_url)
    # This interpreter's NumPy 2 in the stubs, as on a bare CUDA image: the lookup moves tensors by DLPack.
    with TritonServer(TritonConfig(repo, control_mode="explicit", dlpack_only=dlpack_only)) as srv:
        client = grpc.InferenceServerClient(srv.grpc_url)
        for rows, n in ((1, 5), (1, 8), (2, 12)):
            hist, cands = _requests(rng, rows=rows, n=n)
            scores, known, user_known, version = _rank(client, hist, cands)
            want, want_known, want_user, want_version = _rank(reference, hist, cands)
            assert known.tolist() == want_known.tolist() and (scores[~known] == -np.inf).all()
            assert user_known.tolist() == want_user.tolist() and version.tolist() == want_version.tolist()
            np.testing.assert_allclose(scores[known], want[known], atol=1e-5, rtol=1e-5)
        with pytest.raises(grpc.InferenceServerException, match="candidate_ids is empty"):
            _rank(client, np.ones((1, 3)), np.ones((1, 0)))
        # A new table version (one new item) loads without a restart and is what the program reads.
        manifest = Manifest.read(small_export.out)
        table = it.ItemTable.read(small_export.out / "item_table")
        new_id, vector = NUM_ITEMS + 5, np.random.default_rng(4).standard_normal((1, manifest.model.d))
        swapped = table.with_items(np.array([new_id]), vector, version=2)
        add_table_version(repo, swapped)
        client.load_model("item_lookup")
        assert client.is_model_ready("item_lookup", "2") and not client.is_model_ready("item_lookup", "1")
        hist, cands = np.array([[1, 2, 3]]), np.array([[new_id, 4]])
        scores, known, _, version = _rank(client, hist, cands)
        assert version.tolist() == [[2]]  # the new table answers
        graph = OrtGraph(small_export.out / manifest.graph("ranking").file)
        want = graph.run(it.rank_inputs(swapped, manifest.model.lookup(), hist, cands))["scores"]
        assert known.tolist() == [[True, True]]
        np.testing.assert_allclose(scores, want, atol=1e-5, rtol=1e-5)
        assert srv.supervisor.recoveries == []  # the stubs the server stopped itself were no deaths


@pytest.mark.gpu  # CUDA graphs
def test_cuda_graph_buckets_replay_the_eager_scores(tmp_path):
    out, manifest, table, lookup = _export(tmp_path, **{"interest.long_len": 12})
    program = manifest.programs["ranking"]
    rng = np.random.default_rng(5)
    # The last GPU: where there are several, the captures must not land on GPU 0's stream.
    gpu = torch.device("cuda", torch.cuda.device_count() - 1)
    for file in (program.file, program.fp16_file):
        graphs = TorchRanker(out / file, program.inputs, table, lookup, gpu, Bucket.parse("1x8,4x16"))
        eager = TorchRanker(
            out / file,
            program.inputs,
            table,
            lookup,
            gpu,
            Bucket.parse("1x8,4x16"),
            cuda_graphs=False,
        )
        assert len(graphs.captured) == 2 and not eager.captured
        for rows, n in ((1, 3), (1, 8), (3, 11), (4, 16), (6, 5)):  # the last fits no bucket
            hist, cands = _requests(rng, rows=rows, n=n)
            got, known, _ = graphs.score(hist, cands)
            want, _, _ = eager.score(hist, cands)
            torch.testing.assert_close(got, want)  # the same kernels, replayed
            cpu = TorchRanker(out / program.file, program.inputs, table, lookup, torch.device("cpu"))
            np.testing.assert_allclose(
                got.numpy()[known], cpu.score(hist, cands)[0].numpy()[known], atol=2e-2
            )
