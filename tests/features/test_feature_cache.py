"""`mmrank features`: the cache's shapes and masks, reuse and invalidation by content hash, atomic
failure on a corrupt image, and the uniform store view. conftest.py keeps every test offline."""

from __future__ import annotations

import io
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from common.errors import DataError
from mmrank.cli import main as mmrank_main
from trainer.data.schema import ITEMS, MANIFEST, Manifest
from trainer.features.cache import FeatureConfig, build_features
from trainer.features.store import CACHE_VERSION, load_item_features

pytestmark = pytest.mark.threads(1)  # the CPU is shared with other test runs (conftest.py)

TITLES = ["Toy Story", "Heat", None, "", "Fargo", "Alien", "Up"]
OVERVIEWS = [
    "toys come alive",
    "cops and robbers",
    "a quiet film",
    None,
    "snow and crime",
    "   ",
    "a house flies away on balloons",
]
TEXT_MASK = [[1, 1], [1, 1], [0, 1], [0, 0], [1, 1], [1, 0], [1, 1]]
NO_IMAGE = {2}  # item ids without an image


def _png(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(9, 6, 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _write_dataset(root, text_fields=("title", "overview"), has_images=True, item_features=None):
    n = len(TITLES)
    items = pd.DataFrame({"item_id": np.arange(1, n + 1), "created_at": np.zeros(n, dtype=np.int64)})
    if text_fields:
        items["title"], items["overview"] = TITLES, OVERVIEWS
    if has_images:
        items["image"] = [None if i in NO_IMAGE else _png(i) for i in range(1, n + 1)]
    root.mkdir(parents=True)
    items.to_parquet(root / ITEMS)
    manifest = Manifest(
        name="tiny",
        source="test",
        seed=0,
        label_rule="none",
        counts={"items": n, "users": 0, "events": 0},
        splits={},
        text_fields=list(text_fields),
        item_categoricals={},
        user_features={},
        has_images=has_images,
        item_features=item_features or {},
    )
    (root / MANIFEST).write_text(manifest.to_json())
    return root


def _edit_items(root, column: str, item_id: int, value) -> None:
    items = pd.read_parquet(root / ITEMS)
    items[column] = [
        value if i == item_id else v for i, v in zip(items["item_id"], items[column], strict=True)
    ]
    items.to_parquet(root / ITEMS)


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    # batch_size 3 splits 7 items into several batches
    return FeatureConfig(batch_size=3, onnx_dir=tmp_path_factory.mktemp("onnx"), threads=1, progress=False)


@pytest.fixture(scope="module")
def built(tmp_path_factory, config):
    root = _write_dataset(tmp_path_factory.mktemp("data") / "tiny")
    return root, build_features(root, config)


@pytest.fixture
def copy(built, tmp_path):
    return shutil.copytree(built[0], tmp_path / "tiny")


def _load(root, name):
    return np.load(root / "features" / f"{name}.npy"), np.load(root / "features" / f"{name}_mask.npy")


def test_first_run_shapes_and_masks(built):
    root, report = built
    n = len(TITLES)
    assert {m: (r.computed, r.reused) for m, r in report.modalities.items()} == {
        "text": (n, 0),
        "image": (n, 0),
    }
    text, text_mask = _load(root, "text")
    image, image_mask = _load(root, "image")
    assert text.shape == (n + 1, 2, 384) and text.dtype == np.float32 and text_mask.dtype == bool
    assert image.shape == (n + 1, 1, 1280) and image_mask.shape == (n + 1, 1)
    assert text_mask[1:].astype(int).tolist() == TEXT_MASK and not text_mask[0].any()
    assert image_mask[1:, 0].tolist() == [i not in NO_IMAGE for i in range(1, n + 1)]
    np.testing.assert_allclose(np.linalg.norm(text[text_mask], axis=-1), 1.0, atol=1e-5)
    assert not text[~text_mask].any() and not image[~image_mask].any()
    assert (np.linalg.norm(image[image_mask], axis=-1) > 0).all()
    meta = json.loads((root / "features" / "meta.json").read_text())
    assert meta["num_items"] == n
    assert meta["modalities"]["text"]["settings"]["fields"] == ["title", "overview"]
    assert len(meta["modalities"]["image"]["settings"]["weights_sha256"]) == 64


def test_cache_matches_the_torch_encoders(built):
    from trainer.features.image import ImageEncoder, load_image
    from trainer.features.text import TextEncoder

    root, _ = built
    text, _ = _load(root, "text")
    image, _ = _load(root, "image")
    text_encoder, image_encoder = TextEncoder().eval(), ImageEncoder().eval()
    with torch.no_grad():
        overview = text_encoder(*text_encoder.tokenize([OVERVIEWS[6]], 128))[0].numpy()
        poster = image_encoder(load_image(_png(5))[None])[0].numpy()
    assert np.abs(text[7, 1] - overview).max() <= 1e-4
    assert np.abs(image[5, 0] - poster).max() <= 1e-4


def test_torch_runtime_builds_the_same_cache(built, copy, config):
    shutil.rmtree(copy / "features")
    report = build_features(copy, FeatureConfig(**{**config.__dict__, "runtime": "torch"}))
    assert {r.runtime for r in report.modalities.values()} == {"torch"}
    for name in ("text", "image"):
        (before, before_mask), (after, after_mask) = _load(built[0], name), _load(copy, name)
        np.testing.assert_array_equal(before_mask, after_mask)
        assert np.abs(before - after).max() <= 1e-4


def test_rerun_recomputes_nothing(built, copy, config):
    report = build_features(copy, config)
    assert {m: (r.computed, r.reused) for m, r in report.modalities.items()} == {
        "text": (0, 7),
        "image": (0, 7),
    }
    for name in ("text", "image"):
        for before, after in zip(_load(built[0], name), _load(copy, name), strict=True):
            np.testing.assert_array_equal(before, after)


def test_changed_text_recomputes_one_item(built, copy, config):
    _edit_items(copy, "overview", 5, "a woodchipper in the snow")
    report = build_features(copy, config)
    assert (report.modalities["text"].computed, report.modalities["text"].reused) == (1, 6)
    assert report.modalities["image"].computed == 0
    before, after = _load(built[0], "text")[0], _load(copy, "text")[0]
    # The title did not change, but its batch did (other items, other padding): equal up to padding.
    np.testing.assert_allclose(before[5, 0], after[5, 0], atol=1e-5)
    assert np.abs(before[5, 1] - after[5, 1]).max() > 1e-3
    np.testing.assert_array_equal(np.delete(before, 5, axis=0), np.delete(after, 5, axis=0))


def test_changed_image_recomputes_one_item(built, copy, config):
    _edit_items(copy, "image", 3, _png(99))
    report = build_features(copy, config)
    assert (report.modalities["image"].computed, report.modalities["image"].reused) == (1, 6)
    assert report.modalities["text"].computed == 0
    before, after = _load(built[0], "image")[0], _load(copy, "image")[0]
    assert np.abs(before[3] - after[3]).max() > 1e-3
    np.testing.assert_array_equal(np.delete(before, 3, axis=0), np.delete(after, 3, axis=0))


def test_changed_settings_recompute_the_modality(copy, config):
    shorter = FeatureConfig(**{**config.__dict__, "max_text_tokens": 4})
    report = build_features(copy, shorter)
    assert report.modalities["text"].computed == 7 and report.modalities["image"].computed == 0


def test_another_runtime_recomputes_every_row(copy, config):
    """The runtimes agree to 1e-4, not exactly: rows of the other one are not reused."""
    report = build_features(copy, FeatureConfig(**{**config.__dict__, "runtime": "torch"}))
    assert {m: (r.computed, r.reused, r.runtime) for m, r in report.modalities.items()} == {
        "text": (7, 0, "torch"),
        "image": (7, 0, "torch"),
    }
    meta = json.loads((copy / "features" / "meta.json").read_text())
    assert {m["settings"]["runtime"] for m in meta["modalities"].values()} == {"torch"}


def test_a_cache_of_another_version_is_refused_for_training_and_rebuilt(copy, config):
    path = copy / "features" / "meta.json"
    meta = json.loads(path.read_text())
    path.write_text(json.dumps({**meta, "version": CACHE_VERSION - 1}))
    with pytest.raises(
        DataError,
        match=f"meta.json: feature cache version {CACHE_VERSION - 1}, this version reads {CACHE_VERSION}; "
        "run `mmrank features",
    ):
        load_item_features(copy)
    report = build_features(copy, config)  # nothing of it is reused
    assert {m: (r.computed, r.reused) for m, r in report.modalities.items()} == {
        "text": (7, 0),
        "image": (7, 0),
    }
    assert json.loads(path.read_text())["version"] == CACHE_VERSION
    load_item_features(copy)


@pytest.mark.parametrize(
    "option,value,allowed",
    [
        ("--batch-size", "0", ">= 1"),
        ("--max-text-tokens", "0", "in [3, 512]"),
        ("--max-text-tokens", "1", "in [3, 512]"),
        ("--max-text-tokens", "-5", "in [3, 512]"),
        ("--max-text-tokens", "513", "in [3, 512]"),
    ],
)
def test_an_option_out_of_range_is_one_line(copy, capsys, option, value, allowed):
    assert mmrank_main(["features", "--data", str(copy), option, value]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and f"{option} must be an integer {allowed}, got {value}" in errors[0]


def test_corrupt_image_names_the_item_and_keeps_the_cache(copy, config):
    meta_before = (copy / "features" / "meta.json").read_bytes()
    _edit_items(copy, "overview", 1, "changed, so text work happens before the failure")
    _edit_items(copy, "image", 4, b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(DataError, match=r"item_id 4: unreadable image"):
        build_features(copy, config)
    assert (copy / "features" / "meta.json").read_bytes() == meta_before
    assert sorted(p.name for p in copy.iterdir()) == sorted([ITEMS, MANIFEST, "features"])  # no temp left


def test_a_decompression_bomb_names_the_item(copy, config, monkeypatch):
    """PIL refuses an image over twice MAX_IMAGE_PIXELS with DecompressionBombError, a plain Exception;
    lowering the limit makes a 9 x 6 image one."""
    _edit_items(copy, "image", 4, _png(98))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 10)
    with pytest.raises(DataError, match=r"item_id 4: unreadable image \(DecompressionBombError"):
        build_features(copy, config)


def test_store_joins_cache_and_precomputed_features(copy):
    n = len(TITLES)
    extra = np.zeros((n + 1, 5), dtype=np.float64)
    extra[1:4] = np.arange(15).reshape(3, 5) + 1.0
    (copy / "item_features").mkdir()
    np.save(copy / "item_features" / "v_feat.npy", extra)
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["item_features"] = {"v_feat": "item_features/v_feat.npy"}
    (copy / MANIFEST).write_text(json.dumps(manifest))

    features = load_item_features(copy)
    assert features.num_items == n
    assert features.dims() == {"text": (2, 384), "image": (1, 1280), "v_feat": (1, 5)}
    feats, mask = features.modalities["v_feat"]
    assert feats.dtype == np.float32 and mask.dtype == bool
    np.testing.assert_array_equal(feats[:, 0], extra.astype(np.float32))
    assert mask[:, 0].tolist() == [False, True, True, True, False, False, False, False]
    assert features.modalities["text"][1][1:].astype(int).tolist() == TEXT_MASK


def test_store_refuses_features_of_other_encoder_weights(copy):
    meta = json.loads((copy / "features" / "meta.json").read_text())
    meta["modalities"]["image"]["settings"]["weights_sha256"] = "0" * 64
    (copy / "features" / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(
        DataError, match=r"efficientnet-lite0 weights than the installed ones; run `mmrank features"
    ):
        load_item_features(copy)


def test_store_errors_name_the_fix(copy):
    manifest = json.loads((copy / MANIFEST).read_text())
    manifest["counts"]["items"] = len(TITLES) + 1
    (copy / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="stale feature cache: 7 items, dataset has 8"):
        load_item_features(copy)
    shutil.rmtree(copy / "features")
    with pytest.raises(DataError, match=r"run `mmrank features --data .*` first"):
        load_item_features(copy)


def test_dataset_without_content_needs_no_encoder(tmp_path, config):
    root = _write_dataset(tmp_path / "bare", text_fields=(), has_images=False)
    report = build_features(root, config)
    assert report.modalities == {}
    assert load_item_features(root).modalities == {}


def test_cli(copy, capsys):
    assert mmrank_main(["features", "--data", str(copy)]) == 0
    assert "text: 0 computed (-), 7 reused" in capsys.readouterr().out
    _edit_items(copy, "image", 6, b"garbage")
    assert mmrank_main(["features", "--data", str(copy)]) == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "item_id 6: unreadable image (unknown format)" in errors[0]
