"""Parity on real ML-100K inputs: TMDB overviews and posters through the encoder graphs, and real user
histories and candidates through lookup + ranking graph, on the canonical dataset `mmrank data ml100k`
builds (about 3 s). The content features are random (building the feature cache takes minutes): what is
real here is the text, the images, the ids, the categoricals and the histories.
"""

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_model

from export.manifest import Manifest
from export.onnx_graphs import ExportConfig, export_model, graph_builds
from export.parity import dataset_scores, graph_parity
from model_repository.text_inputs import ItemTokenizer

REAL = Path(__file__).resolve().parents[3] / "shared" / "data" / "ml100k_tmdb_posters"
pytestmark = [
    pytest.mark.skipif(not REAL.is_dir(), reason=f"real data not at {REAL}"),
    pytest.mark.slow,  # the real dataset through the encoders and graphs
]


@pytest.fixture(scope="module")
def ml100k(tmp_path_factory):
    from trainer.data.ml100k import ML100KConfig, build_ml100k
    from trainer.data.schema import load_dataset

    out = tmp_path_factory.mktemp("ml100k") / "data"
    build_ml100k(REAL, out, ML100KConfig())
    return load_dataset(out, validate=False)


def _items(ds, count: int = 12) -> pd.DataFrame:
    items = ds.items.sort_values("item_id")
    with_both = items[items["image"].notna() & (items["overview"].str.len() > 0)]
    return pd.concat([with_both.head(count - 2), items[items["image"].isna()].head(2)])


def test_encoder_graphs_on_real_overviews_and_posters(ml100k, small_export):
    from trainer.features.image import IMAGE_SIZE, load_image

    items = _items(ml100k)
    manifest = Manifest.read(small_export.out)
    builds = graph_builds(small_export.model, small_export.text, small_export.config)
    tokenizer = ItemTokenizer(small_export.out / "tokenizer", manifest.tokenizer.max_length, False)
    ids, mask, _ = tokenizer(items[["title", "overview"]].to_numpy(dtype=object))
    assert mask.sum() > 10 * len(items)  # real text, not padding
    results = graph_parity(
        "text_encoder",
        builds["text_encoder"].module,
        small_export.out,
        manifest,
        {"input_ids": ids, "attention_mask": mask},
    )
    pixels = np.stack(
        [
            load_image(bytes(b)).numpy()
            if b is not None
            else np.zeros((3, IMAGE_SIZE, IMAGE_SIZE), np.float32)
            for b in items["image"]
        ]
    )
    results += graph_parity(
        "image_encoder", builds["image_encoder"].module, small_export.out, manifest, {"pixels": pixels}
    )
    for r in results:
        assert r.ok, r.line()


def test_pretrained_minilm_graph_on_real_overviews(ml100k, tmp_path):
    """The real all-MiniLM-L6-v2 (the frozen text encoder of every preset) exported and compared."""
    from export.onnx_graphs import text_build, write_graph
    from model_repository.ort_graph import OrtGraph
    from trainer.features.text import TextEncoder, text_model_path

    encoder = TextEncoder().eval()
    build = text_build(encoder, 2)
    spec = write_graph("text_encoder", build, tmp_path, fp16=True)
    items = _items(ml100k)
    ids, mask, _ = ItemTokenizer(text_model_path(), 128, False)(
        items[["title", "overview"]].to_numpy(dtype=object)
    )
    with torch.inference_mode():
        expected = build.module(torch.from_numpy(ids), torch.from_numpy(mask)).numpy()
    for file, tol in ((spec.file, 1e-4), (spec.fp16_file, 1e-2)):
        got = OrtGraph(tmp_path / file).run({"input_ids": ids, "attention_mask": mask})["text_feats"]
        assert np.max(np.abs(got - expected)) <= tol, file


def _real_schema(ds):
    from trainer.model.ranking_model import ModelSchema

    m, n = ds.manifest, ds.num_items
    items = ds.items.sort_values("item_id")
    cats = np.zeros((n + 1, len(m.item_categoricals)), np.int64)
    cats[items["item_id"].to_numpy()] = items[list(m.item_categoricals)].to_numpy(dtype=np.int64)
    gen = torch.Generator().manual_seed(0)
    text, image = torch.randn(n + 1, 2, 384, generator=gen), torch.rand(n + 1, 1, 1280, generator=gen)
    text_mask = torch.ones(n + 1, 2, dtype=torch.bool)
    image_mask = torch.from_numpy(np.r_[False, items["image"].notna().to_numpy()])[:, None]
    text[0], text_mask[0] = 0, False
    return ModelSchema(
        n,
        ds.num_users,
        torch.from_numpy(cats),
        tuple(m.item_categoricals.values()),
        tuple(m.user_features.values()),
        {"text": (text, text_mask), "image": (image, image_mask)},
    )


@pytest.mark.parametrize(
    "overrides", [{}, {"interest.long_len": 50, "ranker.mixer": "rankmixer"}], ids=["em3like", "long"]
)
def test_real_samples_through_lookup_and_ranking_graph(ml100k, tmp_path, overrides):
    """Test-split events with the histories the trainer's sample builder gives them (cold-start items,
    users without history included), served through lookup + ranking graph vs the training path."""
    model = make_model(_real_schema(ml100k), **{"interest.short_len": 20, **overrides})
    export_model(model, tmp_path / "x", {"path": "-", "sha256": "0"}, None, ExportConfig(fp16=False))
    served, trained = dataset_scores(model, tmp_path / "x", ml100k, "test", rows=400)
    np.testing.assert_allclose(served, trained, atol=1e-5, rtol=0)
