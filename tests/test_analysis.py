"""EM3 §4.5 embedding analyses on embedding tables: parity with the plain reference and planted structure."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from common.errors import MMRankError
from trainer.analysis import (
    analysis_report,
    cosine_neighbours,
    frozen_content_space,
    item_id_table,
    neighbour_similarity,
    neighbour_similarity_reference,
    popular_items,
    recent_items,
    report_markdown,
    sample_ids,
    write_report,
)


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(5, 60),
    d_search=st.integers(3, 8),  # continuous vectors in >= 3 dims: no tied cosines (1-d gives only +-1)
    d_measure=st.integers(1, 8),
    k=st.integers(1, 4),
)
def test_neighbour_similarity_matches_reference(seed, n, d_search, d_measure, k):
    rng = np.random.default_rng(seed)
    search = rng.standard_normal((n + 1, d_search))
    measure = rng.standard_normal((n + 1, d_measure))
    measure[rng.random(n + 1) < 0.1] = 0.0  # items without content: cosine 0
    pool = np.sort(rng.choice(np.arange(1, n + 1), rng.integers(k + 1, n + 1), replace=False))
    queries = rng.choice(pool, rng.integers(1, len(pool) + 1), replace=False)
    got = neighbour_similarity(queries, search, measure, pool, k)
    expected = neighbour_similarity_reference(queries, search, measure, pool, k)
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_cosine_neighbours_excludes_self_and_orders_nearest_first():
    space = np.array([[0, 0], [1, 0], [1, 0.1], [0, 1], [1, 0.5], [-1, 0]], dtype=float)
    pool = np.arange(1, 6)
    nb = cosine_neighbours(np.array([1, 3]), space, pool, k=2, chunk=1)
    np.testing.assert_array_equal(nb, [[2, 4], [4, 2]])
    with pytest.raises(MMRankError, match="pool"):
        cosine_neighbours(np.array([1]), space, np.array([1, 2]), k=2)


def _clustered(rng, n, clusters, d, noise):
    label = rng.integers(0, clusters, n + 1)
    centres = rng.standard_normal((clusters, d))
    table = centres[label] + noise * rng.standard_normal((n + 1, d))
    table[0] = 0.0
    return label, table


def test_report_finds_planted_structure():
    rng = np.random.default_rng(0)
    n = 300
    look, frozen = _clustered(rng, n, 10, 16, 0.3)  # what items look like
    behaviour, baseline_ids = _clustered(rng, n, 10, 8, 0.3)  # what users do with them (independent)
    # "em3": ItemID embeddings aligned with the material clusters; content vectors absorb behaviour.
    em3_ids = np.concatenate([np.eye(10)[look] * 3, 0.3 * rng.standard_normal((n + 1, 4))], axis=1)
    em3_content = np.concatenate(
        [frozen, 2 * np.eye(10)[behaviour] * np.linalg.norm(frozen, axis=1, keepdims=True)], 1
    )
    pool = np.arange(1, n + 1)
    report = analysis_report(
        {"id_only": baseline_ids, "em3": em3_ids},
        {"em3": em3_content},
        frozen,
        cold_items=np.arange(1, 101),
        popular=np.arange(101, 201),
        pool=pool,
        baseline="id_only",
    )
    material = report["material_similarity"]["models"]
    behavioural = report["behavioural_similarity"]["models"]
    assert material["em3"]["mean"] > material["id_only"]["mean"] + 0.3
    assert material["em3"]["gain"] > 0 and material["id_only"]["gain"] is None
    assert behavioural["em3"]["mean"] > behavioural["frozen"]["mean"] + 0.3
    assert behavioural["em3"]["gain"] > 0 and behavioural["frozen"]["gain"] is None
    assert report["material_similarity"]["items"] == 100
    assert material["id_only"]["mean"] == pytest.approx(
        neighbour_similarity_reference(np.arange(1, 101), baseline_ids, frozen, pool).mean(), abs=1e-5
    )
    with pytest.raises(MMRankError, match="baseline"):
        analysis_report({"em3": em3_ids}, {}, frozen, np.arange(1, 5), np.arange(1, 5), pool, "id_only")


def test_frozen_space_averages_modality_cosines_and_ignores_masked_tokens():
    rng = np.random.default_rng(1)
    n = 6
    text = rng.standard_normal((n + 1, 2, 5)).astype(np.float32)
    text_mask = np.ones((n + 1, 2), dtype=bool)
    text_mask[3, 1] = False  # item 3 has one empty text field
    image = rng.standard_normal((n + 1, 1, 9)).astype(np.float32)
    image_mask = np.ones((n + 1, 1), dtype=bool)
    image_mask[4] = False  # item 4 has no image
    space = frozen_content_space({"text": (text, text_mask), "image": (image, image_mask)})
    assert space.shape == (n + 1, 14)

    def cos(a, b):
        return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))

    def pooled_text(i):
        return text[i][text_mask[i]].mean(0)

    unit = space / np.linalg.norm(space, axis=1, keepdims=True)
    expected = (cos(pooled_text(1), pooled_text(2)) + cos(image[1, 0], image[2, 0])) / 2
    assert unit[1] @ unit[2] == pytest.approx(expected, abs=1e-6)
    # Item 4 (text only) against item 1: text cosine over sqrt(1 * 2) modalities.
    assert unit[4] @ unit[1] == pytest.approx(cos(pooled_text(4), pooled_text(1)) / np.sqrt(2), abs=1e-6)
    text[3, 1] = 100.0  # a masked token must not change anything
    image[4] = 100.0
    again = frozen_content_space({"text": (text, text_mask), "image": (image, image_mask)})
    np.testing.assert_allclose(again, space, atol=1e-6)
    with pytest.raises(MMRankError, match="no frozen item features"):
        frozen_content_space({})


def test_item_selection():
    items = np.array([1, 2, 3, 1, 2, 4, 5, 1, 5, 6])
    ts = np.array([0, 10, 20, 30, 40, 80, 85, 90, 95, 100])
    np.testing.assert_array_equal(recent_items(items, ts, 0.2), [4, 5, 6])  # first seen at >= 80
    np.testing.assert_array_equal(recent_items(items, ts, 0.5), [4, 5, 6])
    np.testing.assert_array_equal(recent_items(items, ts, 0.9), [2, 3, 4, 5, 6])
    # Impressions: 1 -> 3, 2 -> 2, 5 -> 2, others 1; top 30% of 6 items = 2 items, tie at 2 broken by id.
    np.testing.assert_array_equal(popular_items(items, 0.3), [1, 2])
    np.testing.assert_array_equal(popular_items(items, 1.0), [1, 2, 3, 4, 5, 6])
    drawn = sample_ids(np.arange(100), 10, seed=3)
    assert len(np.unique(drawn)) == 10 and (np.diff(drawn) > 0).all()
    np.testing.assert_array_equal(drawn, sample_ids(np.arange(100), 10, seed=3))
    np.testing.assert_array_equal(sample_ids(np.array([5, 2]), 10), [2, 5])


def test_report_files(tmp_path):
    rng = np.random.default_rng(2)
    tables = {"id_only": rng.standard_normal((21, 4)), "em3": rng.standard_normal((21, 4))}
    frozen = rng.standard_normal((21, 6))
    report = analysis_report(
        tables,
        {"em3": rng.standard_normal((21, 5))},
        frozen,
        np.arange(1, 6),
        np.arange(6, 12),
        np.arange(1, 21),
        "id_only",
    )
    write_report(report, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "analysis.json").read_text()) == json.loads(json.dumps(report))
    text = (tmp_path / "out" / "analysis.md").read_text()
    assert text == report_markdown(report)
    assert "| id_only |" in text and "| frozen |" in text and "| em3 |" in text
    assert "Table 8" in text and "Table 9" in text


def test_item_id_table_reads_the_ranker_embedding():
    class Ranker(nn.Module):
        def __init__(self, with_ids):
            super().__init__()
            self.item_emb = nn.Embedding(5, 3) if with_ids else None

    class Model(nn.Module):
        def __init__(self, with_ids):
            super().__init__()
            self.ranker = Ranker(with_ids)

    model = Model(True)
    np.testing.assert_array_equal(item_id_table(model), model.ranker.item_emb.weight.detach().numpy())
    assert item_id_table(Model(False)) is None
