"""The encoder modules: pooling, masks, tokenisation for the trainable mode, image loading, and the
onnxruntime path against the PyTorch reference."""

from __future__ import annotations

import copy
import importlib.metadata
import io
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image, UnidentifiedImageError
from torch import nn

from common.errors import DataError
from trainer.features import runtime
from trainer.features.image import IMAGE_DIM, IMAGE_SIZE, ImageEncoder, load_image
from trainer.features.runtime import TorchRunner, onnx_path, onnx_runner, sha256_files
from trainer.features.text import TEXT_DIM, TEXT_MAX_TOKENS, TextEncoder

pytestmark = pytest.mark.threads(1)  # the CPU is shared with other test runs (conftest.py)

TEXTS = ["Toy Story", "A cowboy doll is threatened by a new spaceman figure in a boy's room.", "Heat", ""]


@pytest.fixture(scope="module")
def text_encoder():
    return TextEncoder().eval()


@pytest.fixture(scope="module")
def image_encoder():
    return ImageEncoder().eval()


def _png(size: tuple[int, int], mode: str = "RGB", seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
    pixels = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8).squeeze()
    buf = io.BytesIO()
    Image.fromarray(pixels, mode=mode).save(buf, format="PNG")
    return buf.getvalue()


def test_text_features_are_unit_vectors_and_empty_rows_zero(text_encoder):
    ids, mask = text_encoder.tokenize(TEXTS, max_len=16)
    mask[3] = 0  # a row without tokens
    with torch.no_grad():
        out = text_encoder(ids, mask)
    assert out.shape == (4, TEXT_DIM)
    assert torch.isfinite(out).all()
    np.testing.assert_allclose(out[:3].norm(dim=1).numpy(), 1.0, atol=1e-5)
    assert out[3].abs().max() == 0


def test_padding_does_not_change_a_text_feature(text_encoder):
    alone_ids, alone_mask = text_encoder.tokenize(TEXTS[:1], max_len=32)
    ids, mask = text_encoder.tokenize(TEXTS[:2], max_len=32)
    assert ids.shape[1] > alone_ids.shape[1]
    with torch.no_grad():
        np.testing.assert_allclose(
            text_encoder(alone_ids, alone_mask)[0], text_encoder(ids, mask)[0], atol=1e-5
        )


def test_tokenize_items_joins_fields_with_sep(text_encoder):
    items = pd.DataFrame(
        {
            "item_id": [2, 1, 3],  # unordered on purpose: rows are placed by item id
            "title": ["Heat", "Toy Story", None],
            "overview": ["cops and robbers", None, "  "],
        }
    )
    ids, mask = text_encoder.tokenize_items(items, ["title", "overview"], max_len=24)
    sep = text_encoder.tokenizer.sep_token_id
    assert ids.shape == mask.shape and ids.shape[0] == 4
    assert mask[0].sum() == 0 and mask[3].sum() == 0  # padding row, item without text
    assert (ids[2] == sep).sum() == 2  # "Heat [SEP] cops and robbers [SEP]"
    assert (ids[1] == sep).sum() == 1
    expected, expected_mask = text_encoder.tokenize(["Toy Story"], max_len=24)
    assert torch.equal(ids[1, : expected.shape[1]], expected[0])
    assert torch.equal(mask[1, : expected.shape[1]], expected_mask[0])


def test_train_top_layers_freezes_the_rest(text_encoder):
    encoder = copy.deepcopy(text_encoder).train()
    encoder.train_top_layers(2)
    ids, mask = encoder.tokenize(TEXTS[:2], max_len=16)
    encoder(ids, mask).sum().backward()
    layers = encoder.model.encoder.layer
    assert all(p.grad is not None for p in layers[-1].parameters())
    assert all(p.grad is None for p in layers[0].parameters())
    assert all(p.grad is None for p in encoder.model.embeddings.parameters())
    with pytest.raises(ValueError):
        encoder.train_top_layers(7)


@pytest.mark.parametrize("size,mode", [((40, 60), "RGB"), ((300, 200), "RGBA"), ((9, 9), "L")])
def test_load_image_gives_normalised_224_crop(size, mode):
    x = load_image(_png(size, mode))
    assert x.shape == (3, IMAGE_SIZE, IMAGE_SIZE) and x.dtype == torch.float32
    assert -2.2 < float(x.min()) and float(x.max()) < 2.7  # inside ImageNet-normalised [0, 1] range


def test_load_image_rejects_garbage():
    with pytest.raises((UnidentifiedImageError, OSError)):
        load_image(b"not an image at all")


def test_image_encoder_shape(image_encoder):
    pixels = torch.stack([load_image(_png((32, 48), seed=s)) for s in range(2)])
    with torch.no_grad():
        out = image_encoder(pixels)
    assert out.shape == (2, IMAGE_DIM)
    assert torch.isfinite(out).all() and (out >= 0).all()  # pooled ReLU6 activations


def test_onnxruntime_matches_torch(text_encoder, image_encoder, tmp_path):
    rng = np.random.default_rng(0)
    ids, mask = text_encoder.tokenize(TEXTS, max_len=20)
    mask[3] = 0
    rand_ids = rng.integers(1000, 30000, size=(3, 11)).astype(np.int64)
    rand_mask = (np.arange(11)[None, :] < np.array([[11], [5], [1]])).astype(np.int64)
    pixels = rng.standard_normal((3, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32)
    cases = [
        (text_encoder, "text", [(ids.numpy(), mask.numpy()), (rand_ids, rand_mask)]),
        (image_encoder, "image", [(pixels,), (load_image(_png((50, 70))).numpy()[None],)]),
    ]
    for module, name, inputs in cases:
        reference = TorchRunner(module)
        fast = onnx_runner(module, name, sha256_files(module.weights_files), tmp_path, threads=1)
        for x in inputs:
            assert np.abs(fast(*x) - reference(*x)).max() <= 1e-4, name
    assert len(list(tmp_path.glob("*.onnx"))) == 2


def test_the_token_limit_is_the_models(text_encoder):
    assert text_encoder.model.config.max_position_embeddings == TEXT_MAX_TOKENS


class _Double(nn.Module):
    """An encoder in miniature: exports in a moment."""

    onnx_inputs = ("x",)
    onnx_axes = {"x": {0: "batch"}, "features": {0: "batch"}}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    def example_inputs(self) -> tuple[torch.Tensor]:
        return (torch.ones(2, 3),)


def test_a_corrupt_cached_graph_is_exported_again(tmp_path):
    path = onnx_path(_Double(), "double", "weights", tmp_path)
    path.write_bytes(b"\x08\x07 a graph cut short by a crash")
    run = onnx_runner(_Double(), "double", "weights", tmp_path, threads=1)
    assert run(np.ones((1, 3), np.float32)).tolist() == [[2.0, 2.0, 2.0]]
    assert path.stat().st_size > 100 and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_a_graph_that_cannot_load_after_a_fresh_export_is_named(tmp_path, monkeypatch):
    def broken_export(module, example, input_names, dynamic_axes, path):
        Path(path).write_bytes(b"not a graph")

    monkeypatch.setattr(runtime, "export_onnx", broken_export)
    with pytest.raises(DataError, match="onnxruntime cannot load the graph") as info:
        onnx_runner(_Double(), "double", "weights", tmp_path, threads=1)
    assert Path(info.value.path) == onnx_path(_Double(), "double", "weights", tmp_path)


def test_the_graph_cache_key_holds_the_exporter_versions(tmp_path, monkeypatch):
    before = onnx_path(_Double(), "double", "weights", tmp_path)
    version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version", lambda p: "99.0" if p == "torch" else version(p))
    assert onnx_path(_Double(), "double", "weights", tmp_path) != before
