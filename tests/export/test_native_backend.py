"""Triton's native onnxruntime backend (export/native_backend.py), built by `make setup`, on the real
tritonserver next to the Python backend.

Nothing is mocked: the server loads the built libtriton_onnxruntime.so and ONNX Runtime 1.19.2 and
answers tritonclient calls on loopback. The serving tests fail, never skip, where the backend is not
built (the `native_backend` fixture).
"""

import os
import shutil

import numpy as np
import onnx
import pytest
import tritonclient.grpc as grpc
from conftest import NUM_ITEMS, NUM_USERS
from onnx import TensorProto, helper, numpy_helper
from test_triton_server import _png, _rank

from common.errors import MMRankError
from export import native_backend as nb
from export import native_runtime as nr
from export.manifest import GraphSpec, onnx_io
from export.repository import RenderConfig, graph_config, write_config, write_python_model
from export.triton_launcher import TritonConfig, TritonServer, native_backend, native_models

TABLE = np.arange(40, dtype=np.float32).reshape(10, 4) / 8  # the tiny graph's embedded rows


def tiny_graph(path, fit: bool = True):
    """scores[b, n] = TABLE[ids[b, n]] . x[b], at the IR version the `onnx` package writes by default
    unless `fit`."""
    nodes = [
        helper.make_node("Gather", ["table", "ids"], ["rows"]),
        helper.make_node("Unsqueeze", ["x", "last"], ["column"]),
        helper.make_node("MatMul", ["rows", "column"], ["products"]),
        helper.make_node("Squeeze", ["products", "last"], ["scores"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [
            helper.make_tensor_value_info("ids", TensorProto.INT64, ["batch", "n"]),
            helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4]),
        ],
        [helper.make_tensor_value_info("scores", TensorProto.FLOAT, ["batch", "n"])],
        [numpy_helper.from_array(TABLE, "table"), numpy_helper.from_array(np.array([-1], np.int64), "last")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(nr.fit_native_runtime(model) if fit else model, path)
    return path


def tiny_repository(folder, backends=(("tiny_native", "onnxruntime"), ("tiny_python", "python"))):
    """One model per (name, backend) running the tiny graph, rendered as `mmrank repo` renders graphs."""
    for name, backend in backends:
        version = folder / name / "1"
        version.mkdir(parents=True)
        tiny_graph(version / "model.onnx")
        inputs, outputs = onnx_io(version / "model.onnx")
        spec = GraphSpec("model.onnx", None, "", None, inputs, outputs)
        write_config(folder / name, graph_config(name, spec, RenderConfig(backend=backend, max_batch_size=8)))
        if backend == "python":
            write_python_model(version, "graph_model.py")
    return folder


def _input(name, array, dtype):
    t = grpc.InferInput(name, list(array.shape), dtype)
    t.set_data_from_numpy(array)
    return t


# ---- build and cache -------------------------------------------------------------------------------
def test_source_digest_follows_the_content_not_timestamps_or_the_readme(tmp_path):
    sources = shutil.copytree(nb.SOURCES, tmp_path / "sources")
    digest = nb.source_digest(sources)
    assert digest == nb.source_digest(nb.SOURCES)
    source = sources / "onnxruntime_backend" / "src" / "onnxruntime.cc"
    os.utime(source, (0, 0))
    (sources / "README.md").write_text("notes\n")
    assert nb.source_digest(sources) == digest
    source.write_bytes(source.read_bytes() + b"\n")
    assert nb.source_digest(sources) != digest


def test_incomplete_sources_are_named(tmp_path):
    sources = shutil.copytree(nb.SOURCES, tmp_path / "sources")
    (sources / "core" / "LICENSE").unlink()
    with pytest.raises(MMRankError, match=r"core: incomplete backend sources"):
        nb.source_commits(sources)


def test_a_missing_tool_is_one_line_saying_what_to_install(tmp_path):
    progress = nb.Progress(tmp_path / "log")
    with pytest.raises(MMRankError, match=r"needs patchelf, rapidjson-dev: install patchelf rapidjson-dev"):
        nb.install_packages(["patchelf", "rapidjson-dev"], progress, allowed=False)


def test_a_failed_build_names_the_step_and_the_log_and_keeps_the_previous_build(native_backend, tmp_path):
    sources = shutil.copytree(nb.SOURCES, tmp_path / "sources")
    cmake = sources / "onnxruntime_backend" / "CMakeLists.txt"
    cmake.write_text(cmake.read_text() + '\nmessage(FATAL_ERROR "a broken source tree")\n')
    home = tmp_path / "home"
    shutil.copytree(native_backend.dir, home / nb.NAME, symlinks=True)  # a previous build
    wheels = home / ".work" / "wheels"  # the cached wheel: no download in a test
    wheels.mkdir(parents=True)
    shutil.copy2(native_backend.dir.parent / ".work" / "wheels" / nb.ORT_WHEEL, wheels)
    with pytest.raises(MMRankError) as failed:
        nb.build(nb.BuildConfig(sources=sources, home=home, install_tools=False))
    log = home / ".work" / "build.log"
    assert str(failed.value) == f"cmake configure failed (exit 1): see {log}"
    assert "a broken source tree" in log.read_text()
    assert nb.NativeBackend.find(home).info() == native_backend.info()


def test_the_built_backend_is_current_and_a_second_build_does_nothing(native_backend, tmp_path):
    tools = nb.find_tools(nb.Progress(tmp_path / "log"), install=False)
    info = native_backend.info()
    assert info["key"] == nb.build_key(nb.SOURCES, tools), "the build is stale: run `make setup`"
    assert info["commits"] == nb.source_commits(nb.SOURCES)
    before = (native_backend.dir / nb.LIBRARY).stat()
    again = nb.build(nb.BuildConfig(install_tools=False))
    after = (again.dir / nb.LIBRARY).stat()
    assert again.dir == native_backend.dir and (after.st_ino, after.st_mtime_ns) == (
        before.st_ino,
        before.st_mtime_ns,
    )


def test_an_unbuilt_backend_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setenv(nb.HOME_ENV, str(tmp_path / "none"))
    assert not nb.NativeBackend.built()
    with pytest.raises(MMRankError, match=r"not built .*: run `make setup`"):
        nb.NativeBackend.find()


def test_a_native_repository_without_the_build_is_refused_before_the_server_starts(tmp_path, monkeypatch):
    repo = tiny_repository(tmp_path / "repo")
    python_only = tiny_repository(tmp_path / "python_only", [("tiny_python", "python")])
    assert native_models(repo) == ["tiny_native"] and native_models(python_only) == []
    monkeypatch.setenv(nb.HOME_ENV, str(tmp_path / "none"))
    assert native_backend(python_only) is None  # python-backend repositories serve as before
    server = TritonServer(TritonConfig(repo))
    with pytest.raises(MMRankError, match=r"tiny_native run on Triton's native onnxruntime .*`make setup`"):
        server.start()
    assert server.process is None


# ---- ONNX files for ONNX Runtime 1.19 --------------------------------------------------------------
def test_fit_native_runtime_lowers_the_ir_version_and_refuses_newer_opsets(tmp_path):
    model = onnx.load(tiny_graph(tmp_path / "latest.onnx", fit=False))
    assert model.ir_version > nr.MAX_IR_VERSION  # the `onnx` package's default, which ORT 1.19 cannot read
    fitted = nr.fit_native_runtime(model)
    assert fitted.ir_version == nr.MAX_IR_VERSION
    onnx.checker.check_model(fitted, full_check=True)
    nr.check_native_runtime(fitted, "fitted.onnx")
    model.opset_import[0].version = nr.MAX_OPSET + 1
    with pytest.raises(MMRankError, match=r"opset 22; .* reads up to opset 21"):
        nr.fit_native_runtime(model)


@pytest.mark.parametrize(("ir_version", "opset"), [(11, 17), (10, 22)])
def test_a_file_the_venvs_onnxruntime_reads_but_the_servers_does_not_is_refused(tmp_path, ir_version, opset):
    model = onnx.load(tiny_graph(tmp_path / "tiny.onnx"))
    model.ir_version, model.opset_import[0].version = ir_version, opset
    with pytest.raises(
        MMRankError, match=rf"^v3/model.onnx: IR version {ir_version}, opset {opset}; .*1\.19\.2"
    ):
        nr.check_native_runtime(model, "v3/model.onnx")


# ---- the real server -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_server(native_backend, tmp_path_factory):
    repo = tiny_repository(tmp_path_factory.mktemp("tiny") / "repo")
    with TritonServer(TritonConfig(repo, control_mode="explicit")) as server:
        yield server


def test_a_native_and_a_python_model_answer_side_by_side(tiny_server):
    client = grpc.InferenceServerClient(tiny_server.grpc_url)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, len(TABLE), (3, 5)).astype(np.int64)
    x = rng.standard_normal((3, 4)).astype(np.float32)
    want = np.einsum("bnd,bd->bn", TABLE[ids], x)
    for name in ("tiny_native", "tiny_python"):
        result = client.infer(name, [_input("ids", ids, "INT64"), _input("x", x, "FP32")])
        np.testing.assert_allclose(result.as_numpy("scores"), want, rtol=1e-6, atol=1e-6)
    native = client.get_model_config("tiny_native").config
    # KIND_AUTO resolves to the CPU on a server without GPUs: this build of the backend is CPU-only.
    assert native.backend == "onnxruntime" and native.platform == "onnxruntime_onnx"
    assert [g.kind for g in native.instance_group] == [grpc.model_config_pb2.ModelInstanceGroup.KIND_CPU]
    assert client.get_model_config("tiny_python").config.backend == "python"


def test_a_native_repository_serves_rank_and_encode_items_as_the_python_one(native_server, triton_server):
    native = grpc.InferenceServerClient(native_server.grpc_url)
    python = grpc.InferenceServerClient(triton_server.grpc_url)
    rng = np.random.default_rng(5)
    users, feats = np.array([1, NUM_USERS], np.int64), np.array([[2], [1]], np.int64)
    requests = [
        (
            rng.integers(0, NUM_ITEMS + 1, (2, 6)).astype(np.int64),
            rng.integers(1, NUM_ITEMS + 1, (2, 9)),
            users,
            feats,
        ),
        (np.array([[4, 12345, 7]]), np.array([[1, 99999, 3]]), None, None),  # unknown ids
        (rng.integers(1, NUM_ITEMS + 1, (1, 40)), np.array([[5, 2, 8, 1]]), None, None),  # history over L
    ]
    for hist, cands, user_id, user_feats in requests:
        hist, cands = hist.astype(np.int64), cands.astype(np.int64)
        scores, known = _rank(native, hist, cands, user_id, user_feats)
        want_scores, want_known = _rank(python, hist, cands, user_id, user_feats)
        np.testing.assert_array_equal(known, want_known)
        np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-5)
    texts = np.array([["Toy Story", "A cowboy doll feels threatened."], ["Heat", ""]], dtype=object)
    images = np.array([[_png(0)], [b""]], dtype=object)
    inputs = [_input("text", texts, "BYTES"), _input("image", images, "BYTES")]
    content = native.infer("encode_items", inputs).as_numpy("content")
    np.testing.assert_allclose(content, python.infer("encode_items", inputs).as_numpy("content"), atol=1e-5)
    for graph in ("ranking", "text_encoder", "image_encoder", "fusion"):
        config = native.get_model_config(graph).config
        assert config.platform == "onnxruntime_onnx", graph
        assert [g.kind for g in config.instance_group] == [grpc.model_config_pb2.ModelInstanceGroup.KIND_CPU]


def test_the_served_onnxruntime_refuses_the_onnx_packages_default_ir_version(native_backend, tmp_path):
    """Why exports are fitted: the backend's ONNX Runtime 1.19.2 cannot read what `onnx` writes today."""
    repo = tiny_repository(tmp_path / "repo", [("tiny_native", "onnxruntime")])
    tiny_graph(repo / "tiny_native" / "1" / "model.onnx", fit=False)
    with pytest.raises(MMRankError, match="Unsupported model IR version"):
        TritonServer(TritonConfig(repo, control_mode="explicit")).start()
