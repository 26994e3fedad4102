"""The whole serving path on a trained run: `mmrank export` -> `mmrank repo` -> tritonserver -> gRPC.

The trainer tests' synthetic dataset with its real frozen-encoder feature cache (MiniLM, EfficientNet),
an em3 run of a few steps, then the CLI commands. Checks the served scores against the model on the
trainer's own samples, and that `encode_items` turns raw item text and image bytes into the same
content vectors the model computes from the cached features (tokenizer, encoders, image preprocessing
and fusion all agreeing with the training-time feature pipeline).
"""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import tritonclient.grpc as grpc

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the trainer tests' shared dataset
from trainer_data import synth_with_features  # noqa: E402

from export.parity import check_export, dataset_scores  # noqa: E402
from export.triton_launcher import TritonConfig, TritonServer  # noqa: E402
from mmrank.cli import main  # noqa: E402

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory, pytestconfig):
    from trainer.config import resolve
    from trainer.data.schema import load_dataset
    from trainer.run import load_run
    from trainer.train import train

    torch.set_num_threads(2)
    data = synth_with_features(tmp_path_factory, pytestconfig.cache)
    root = tmp_path_factory.mktemp("pipeline")
    cfg = resolve("em3", sets={"train.lora_epochs": 0, "train.batch_size": 64}, max_steps=5)
    train(data, cfg, root / "run", progress=False)
    assert (
        main(["export", "--run", str(root / "run"), "--out", str(root / "export"), "--data", str(data)]) == 0
    )
    assert main(["repo", "--export", str(root / "export"), "--out", str(root / "repo")]) == 0
    ds = load_dataset(data, validate=False)
    _, model = load_run(root / "run", ds)
    return ds, model, root


def test_exported_graphs_match_the_trained_model(pipeline):
    from export.onnx_graphs import text_setup

    ds, model, root = pipeline
    for r in check_export(model, root / "export", text_setup(ds, model)):
        assert r.ok, r.line()
    served, trained = dataset_scores(model, root / "export", ds, "test", rows=300)
    np.testing.assert_allclose(served, trained, atol=1e-5, rtol=0)


def test_served_by_tritonserver(tritonserver, pipeline):
    ds, model, root = pipeline
    from trainer.data.samples import make_samples

    samples = make_samples(ds, "test", model.cfg.interest.short_len)
    batch = samples.batch(np.arange(0, len(samples), max(1, len(samples) // 12))[:12])
    with torch.inference_mode():
        want = model(batch).logits.numpy()
    items = ds.items.sort_values("item_id").head(6)
    texts = items[ds.manifest.text_fields].fillna("").to_numpy(dtype=object)
    images = np.array([[b"" if x is None else bytes(x)] for x in items["image"]], dtype=object)
    with torch.inference_mode():
        want_content = model.tower(torch.tensor(items["item_id"].to_numpy())).numpy()

    def tensor(name, array, dtype):
        t = grpc.InferInput(name, list(array.shape), dtype)
        t.set_data_from_numpy(array)
        return t

    with TritonServer(TritonConfig(root / "repo")) as server:
        client = grpc.InferenceServerClient(server.grpc_url)
        scores = []
        for i in range(len(batch)):
            result = client.infer(
                "rank",
                [
                    tensor("history_ids", batch.hist_ids[i : i + 1].numpy(), "INT64"),
                    tensor("candidate_ids", batch.item_id[i : i + 1, None].numpy(), "INT64"),
                    tensor("user_id", batch.user_id[i : i + 1, None].numpy(), "INT64"),
                    tensor("user_feats", batch.user_feats[i : i + 1].numpy(), "INT64"),
                ],
            )
            scores.append(result.as_numpy("scores")[0, 0])
        content = client.infer(
            "encode_items", [tensor("text", texts, "BYTES"), tensor("image", images, "BYTES")]
        )
    np.testing.assert_allclose(np.array(scores), want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(content.as_numpy("content"), want_content, atol=1e-4, rtol=0)
