import numpy as np
import pytest
from conftest import NUM_ITEMS, NUM_USERS, make_model, make_schema

from export.manifest import Manifest
from export.onnx_graphs import ExportConfig, export_model, graph_builds, ranking_build
from export.parity import (
    DEFAULT_SIZES,
    TOLERANCES,
    check_export,
    composed_scores,
    graph_parity,
    random_feeds,
    torch_output,
    training_scores,
)


def _requests(seed: int, b: int = 4, n: int = 5, length: int = 6, num_items: int = NUM_ITEMS):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(0, length + 1, b)
    lengths[0], lengths[1] = 0, length  # a user without history, one with a full one
    hist = rng.integers(1, num_items + 1, (b, length)) * (
        np.arange(length)[None] >= (length - lengths)[:, None]
    )
    cands = rng.integers(1, num_items + 1, (b, n))
    return hist, cands, rng.integers(0, NUM_USERS + 1, b), rng.integers(0, 3, (b, 1))


def test_every_graph_matches_its_pytorch_module(small_export):
    results = check_export(small_export.model, small_export.out, small_export.text, small_export.config)
    assert {(r.graph, r.precision) for r in results} == {
        (g, p) for g in ("text_encoder", "image_encoder", "fusion", "ranking") for p in ("fp32", "fp16")
    }
    for r in results:
        assert r.ok, r.line()
        if r.precision == "fp32":
            assert r.max_abs_err <= TOLERANCES["fp32"], r.line()


def test_graphs_follow_dynamic_axes(small_export):
    builds = graph_builds(small_export.model, small_export.text, small_export.config)
    manifest = Manifest.read(small_export.out)
    for sizes_seed, name in enumerate(("ranking", "fusion", "text_encoder")):
        feeds = random_feeds(
            name,
            manifest.graph(name),
            manifest.model,
            {"batch": 5, "candidates": 11, "history": 3, "tokens": 17},
            seed=sizes_seed,
        )
        (r32, *_) = graph_parity(name, builds[name].module, small_export.out, manifest, feeds)
        assert r32.ok, r32.line()


def test_the_ranking_graph_answers_zero_candidates(small_export):
    """[B, 0] scores from the ONNX graphs (fp32 and fp16) as from the module, so neither the native
    lookups nor an in-process caller need a padding candidate of their own."""
    manifest = Manifest.read(small_export.out)
    spec = manifest.graph("ranking")
    feeds = random_feeds("ranking", spec, manifest.model, {"candidates": 0}, seed=4)
    module = ranking_build(small_export.model).module
    assert torch_output(module, spec, feeds).shape == (DEFAULT_SIZES["batch"], 0)
    for r in graph_parity("ranking", module, small_export.out, manifest, feeds):  # raises on a shape
        assert r.ok, r.line()


def test_lookup_then_ranking_graph_equals_the_training_path(small_export):
    hist, cands, users, feats = _requests(seed=1)
    served = composed_scores(small_export.out, hist, cands, users, feats)
    trained = training_scores(small_export.model, hist, cands, users, feats)
    np.testing.assert_allclose(served, trained, atol=1e-5, rtol=0)
    half = composed_scores(small_export.out, hist, cands, users, feats, precision="fp16")
    assert np.max(np.abs(half - trained)) <= TOLERANCES["fp16"]


def test_served_history_longer_than_trained_keeps_the_most_recent_items(small_export):
    hist, cands, users, feats = _requests(seed=2, length=15)
    served = composed_scores(small_export.out, hist, cands, users, feats)
    trained = training_scores(small_export.model, hist[:, -6:], cands, users, feats)
    np.testing.assert_allclose(served, trained, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "overrides",
    [
        {"ranker.use_content_item": False, "ranker.use_content_user": False, "interest.memory_bank": False},
        {
            "interest.long_len": 9,
            "interest.lora_rank": 2,
            "ranker.mixer": "rankmixer",
            "content.fusion": "mean",
            "interest.decoder_layers": 0,
        },
        {"ranker.use_item_id": False, "interest.target_attention": False, "content.fusion": "2flow"},
    ],
    ids=["id_only", "long_history_rankmixer", "no_item_id_2flow"],
)
@pytest.mark.slow  # three more exports
def test_model_variants_export_and_score_like_training(overrides, tmp_path):
    model = make_model(
        make_schema(precomputed=True), **{"content.modalities": ("v_feat", "t_feat"), **overrides}
    )
    if model.cfg.interest.lora_rank:
        model.start_lora_phase()
        model.eval()
    manifest = export_model(model, tmp_path / "x", {"path": "-", "sha256": "0"}, None, ExportConfig())
    assert set(manifest.graphs) <= {"ranking", "fusion"}  # precomputed features have no encoder
    length = max(model.cfg.interest.long_len, 6)
    hist, cands, users, feats = _requests(seed=3, length=length)
    served = composed_scores(tmp_path / "x", hist, cands, users, feats)
    trained = training_scores(model, hist, cands, users, feats)
    np.testing.assert_allclose(served, trained, atol=1e-5, rtol=0)
    for r in check_export(model, tmp_path / "x"):
        assert r.ok, r.line()
