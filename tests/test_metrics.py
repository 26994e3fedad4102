"""The vectorised metrics against sklearn and against the plain per-group / per-user references."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sklearn.metrics import log_loss, roc_auc_score

from common.errors import MMRankError
from trainer.metrics import (
    auc,
    auc_reference,
    ctr_metrics,
    gauc,
    gauc_reference,
    grouped_auc,
    logloss,
    ndcg_at_k,
    recall_at_k,
    top_k,
    topk_metrics,
    topk_reference,
)


def _random_ctr(seed, n, levels):
    """Scores drawn from few levels so that ties within and across classes are common."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    scores = rng.integers(0, levels, n) / levels + 0.1 * labels * rng.random(n)
    return labels, scores


@settings(max_examples=80, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(2, 300), levels=st.integers(1, 20))
def test_auc_matches_sklearn_and_pair_counting(seed, n, levels):
    labels, scores = _random_ctr(seed, n, levels)
    if labels.min() == labels.max():
        assert math.isnan(auc(labels, scores))
        return
    expected = roc_auc_score(labels, scores)
    assert auc(labels, scores) == pytest.approx(expected, abs=1e-12)
    assert auc_reference(labels, scores) == pytest.approx(expected, abs=1e-12)


def test_auc_known_values():
    assert auc([0, 1], [0.1, 0.9]) == 1.0
    assert auc([0, 1], [0.9, 0.1]) == 0.0
    assert auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    # Positives {0.8, 0.4}, negatives {0.4, 0.1}: pairs 1 + 1 + 0.5 + 1 of 4.
    assert auc([1, 1, 0, 0], [0.8, 0.4, 0.4, 0.1]) == pytest.approx(0.875)
    assert math.isnan(auc([1, 1], [0.2, 0.3]))
    assert math.isnan(auc([], []))


@settings(max_examples=80, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    n=st.integers(1, 300),
    n_groups=st.integers(1, 12),
    levels=st.integers(1, 10),
)
def test_gauc_matches_per_group_reference(seed, n, n_groups, levels):
    labels, scores = _random_ctr(seed, n, levels)
    groups = np.random.default_rng(seed + 1).choice(np.arange(100, 100 + 7 * n_groups, 7), n)
    expected = gauc_reference(labels, scores, groups)
    got = gauc(labels, scores, groups)
    if math.isnan(expected):
        assert math.isnan(got)
    else:
        assert got == pytest.approx(expected, abs=1e-12)


def test_grouped_auc_per_group_values():
    labels = np.array([1, 0, 1, 1, 0, 0, 1])
    scores = np.array([0.9, 0.1, 0.3, 0.2, 0.4, 0.7, 0.5])
    groups = np.array([5, 5, 2, 2, 2, 9, 9])
    values, impressions, positives = grouped_auc(labels, scores, groups)
    # Groups in sorted order 2, 5, 9.
    np.testing.assert_allclose(values, [0.0, 1.0, 0.0])
    np.testing.assert_array_equal(impressions, [3, 2, 2])
    np.testing.assert_array_equal(positives, [2, 1, 1])
    # Impression-weighted: (0 * 3 + 1 * 2 + 0 * 2) / 7.
    assert gauc(labels, scores, groups) == pytest.approx(2 / 7)


def test_gauc_skips_single_class_groups():
    labels = np.array([1, 0, 1, 1])
    scores = np.array([0.9, 0.1, 0.3, 0.2])
    groups = np.array([1, 1, 2, 2])
    assert gauc(labels, scores, groups) == 1.0
    assert math.isnan(gauc(labels, scores, np.array([1, 2, 3, 4])))


@settings(max_examples=40, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), n=st.integers(1, 200))
def test_logloss_matches_sklearn(seed, n):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    probs = rng.uniform(0.01, 0.99, n)
    assert logloss(labels, probs) == pytest.approx(log_loss(labels, probs, labels=[0, 1]), rel=1e-10)


def test_logloss_is_clipped():
    value = logloss([1, 0], [0.0, 1.0])
    assert math.isfinite(value)
    assert value == pytest.approx(-math.log(1e-7), rel=1e-6)


def test_bad_inputs_are_named():
    with pytest.raises(MMRankError, match="same length"):
        auc([0, 1, 1], [0.1, 0.2])
    with pytest.raises(MMRankError, match="0/1"):
        auc([0, 2], [0.1, 0.2])
    with pytest.raises(MMRankError, match="non-finite"):
        logloss([0, 1], [0.1, np.nan])
    with pytest.raises(MMRankError, match="groups"):
        gauc([0, 1], [0.1, 0.2], [1])
    with pytest.raises(MMRankError, match="same shape"):
        topk_metrics(np.zeros((2, 3)), np.zeros((2, 4), dtype=bool))


def test_ndcg_and_recall_hand_computed():
    # User 0: ranking 2, 0, 3, 1; held-out {0, 1}. User 1: ranking 1, 3, 0 (item 2 masked); held-out {3}.
    scores = np.array([[0.8, 0.1, 0.9, 0.5], [0.2, 0.9, -np.inf, 0.4]])
    truth = np.array([[True, True, False, False], [False, False, False, True]])
    ideal2 = 1 + 1 / math.log2(3)
    ndcg_user0_k2 = (1 / math.log2(3)) / ideal2  # hit at rank 2 only
    ndcg_user1_k2 = (1 / math.log2(3)) / 1.0  # hit at rank 2, ideal has one hit
    assert recall_at_k(scores, truth, 2) == pytest.approx((0.5 + 1.0) / 2)
    assert ndcg_at_k(scores, truth, 2) == pytest.approx((ndcg_user0_k2 + ndcg_user1_k2) / 2)
    ndcg_user0_k4 = (1 / math.log2(3) + 1 / math.log2(5)) / ideal2
    assert recall_at_k(scores, truth, 4) == pytest.approx(1.0)
    assert ndcg_at_k(scores, truth, 4) == pytest.approx((ndcg_user0_k4 + ndcg_user1_k2) / 2)
    per_user = topk_metrics(scores, truth, ks=(1, 2))
    np.testing.assert_allclose(per_user["recall@1"], [0.0, 0.0])
    np.testing.assert_allclose(per_user["ndcg@2"], [ndcg_user0_k2, ndcg_user1_k2])


def test_top_k_orders_best_first_and_handles_k_above_n():
    scores = np.array([[0.1, 0.7, 0.3], [0.9, 0.2, 0.5]])
    np.testing.assert_array_equal(top_k(scores, 2), [[1, 2], [0, 2]])
    np.testing.assert_array_equal(top_k(scores, 10), [[1, 2, 0], [0, 2, 1]])
    per_user = topk_metrics(scores, np.array([[True, False, False], [False, False, False]]), ks=(5,))
    assert per_user["recall@5"][0] == 1.0
    assert math.isnan(per_user["recall@5"][1])


@settings(max_examples=50, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    users=st.integers(1, 12),
    items=st.integers(1, 60),
    k=st.integers(1, 25),
)
def test_topk_matches_full_sort_reference(seed, users, items, k):
    rng = np.random.default_rng(seed)
    scores = rng.standard_normal((users, items))
    scores[rng.random((users, items)) < 0.2] = -np.inf
    truth = rng.random((users, items)) < 0.15
    truth[0, rng.integers(items)] = True  # at least one user with held-out items
    scores[truth] = np.where(np.isinf(scores[truth]), 0.0, scores[truth])  # held-out items are never masked
    recall, ndcg = topk_reference(scores, truth, k)
    assert recall_at_k(scores, truth, k) == pytest.approx(recall, abs=1e-12)
    assert ndcg_at_k(scores, truth, k) == pytest.approx(ndcg, abs=1e-12)


def test_ctr_metrics_block_is_json_ready():
    labels = np.array([1, 0, 1, 0, 1, 1])
    probs = np.array([0.9, 0.2, 0.6, 0.7, 0.4, 0.8])
    users = np.array([1, 1, 2, 2, 3, 3])
    requests = np.array([10, 10, 10, 11, 11, 11])
    cold = np.array([False, False, False, False, True, True])
    out = ctr_metrics(labels, probs, users, requests, cold)
    assert out["auc"] == pytest.approx(roc_auc_score(labels, probs))
    assert out["gauc"] == pytest.approx(gauc_reference(labels, probs, users))
    assert out["gauc_request"] == pytest.approx(gauc_reference(labels, probs, requests))
    assert out["logloss"] == pytest.approx(log_loss(labels, probs))
    assert (out["n"], out["positives"], out["cold_n"]) == (6, 4, 2)
    assert out["cold_auc"] is None  # the cold events are all positives: AUC undefined
