"""The rendered repository deploys on its own: `mmrank serve --python-env VENV` with a venv holding only
numpy<2, onnxruntime, tokenizers and Pillow (Python 3.10 where this machine has it) serves `rank` and
`encode_items` with the default server's results; serving writes nothing into the repository and poll
mode reloads nothing unchanged."""

import io
import time

import numpy as np
import tritonclient.grpc as grpc

from export.repository import RenderConfig, render_repository
from export.triton_launcher import TritonConfig, TritonServer


def _input(name, array, dtype):
    t = grpc.InferInput(name, list(array.shape), dtype)
    t.set_data_from_numpy(array)
    return t


def _loads(server) -> int:
    return server.log_path.read_text(errors="replace").count("successfully loaded")


def _png() -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (90, 160, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _answers(url: str, num_items: int) -> dict[str, np.ndarray]:
    client = grpc.InferenceServerClient(url)
    rng = np.random.default_rng(6)
    hist = rng.integers(1, num_items + 1, (1, 9)).astype(np.int64)
    cands = np.array([[1, 4, 99_999, 7, num_items]], np.int64)
    ranked = client.infer(
        "rank", [_input("history_ids", hist, "INT64"), _input("candidate_ids", cands, "INT64")]
    )
    texts = np.array([["Heat", "A thief and a detective."], ["", "Only an overview."]], dtype=object)
    images = np.array([[_png()], [b""]], dtype=object)
    encoded = client.infer("encode_items", [_input("text", texts, "BYTES"), _input("image", images, "BYTES")])
    return {
        "scores": ranked.as_numpy("scores"),
        "known": ranked.as_numpy("candidate_known"),
        "content": encoded.as_numpy("content"),
    }


def test_bare_python_env_serves_the_default_servers_results(
    small_export, triton_server, bare_python_env, tmp_path
):
    repo = tmp_path / "repo"
    render_repository(small_export.out, repo, RenderConfig(backend="python", max_batch_size=8))
    before = sorted(p.relative_to(repo) for p in repo.rglob("*"))
    with TritonServer(TritonConfig(repo, control_mode="poll", python_env=bare_python_env)) as bare:
        got = _answers(bare.grpc_url, small_export.model.schema.num_items)
        loads = _loads(bare)
        assert loads > 0
        time.sleep(3 * bare.config.poll_secs)  # three polls of an unchanged repository
        assert _loads(bare) == loads, "poll mode reloaded an unchanged model"
    want = _answers(triton_server.grpc_url, small_export.model.schema.num_items)
    assert got["known"].tolist() == want["known"].tolist() == [[True, True, False, True, True]]
    assert np.isneginf(got["scores"][0, 2])
    np.testing.assert_allclose(got["scores"], want["scores"], atol=1e-5)
    np.testing.assert_allclose(got["content"], want["content"], atol=1e-5)
    assert sorted(p.relative_to(repo) for p in repo.rglob("*")) == before  # no __pycache__, nothing new
