"""Ranking metrics: AUC, GAUC, logloss for CTR data; Recall@K and NDCG@K for full-ranking top-K.

The fast paths are vectorised numpy (one sort for every group at once, `argpartition` for top-K), so
millions of events cost one `lexsort`, never a Python loop over groups. Each has a plain reference at
the bottom of this file that the tests compare it with on random data (and sklearn, for AUC and
logloss).

Conventions: AUC counts a tie between a positive and a negative as half a pair (average ranks), which
is sklearn's `roc_auc_score`; an AUC with one class absent is NaN. Recall@K and NDCG@K follow MMRec:
recall divides the hits in the top K by the user's number of held-out items, NDCG's ideal DCG places
min(K, held-out) hits first, and both are averaged over the users that have held-out items.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from common.errors import MMRankError

LOGLOSS_EPS = 1e-7


def _check_pair(labels, values, name: str) -> tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels)
    values = np.asarray(values, dtype=np.float64)
    if labels.ndim != 1 or labels.shape != values.shape:
        raise MMRankError(f"labels {labels.shape} and {name} {values.shape} must be 1-d of the same length")
    if labels.size and not np.isin(labels, (0, 1)).all():
        raise MMRankError(f"labels must be 0/1, got values {np.unique(labels)[:5].tolist()}")
    if not np.isfinite(values).all():
        raise MMRankError(f"{name} contain {int((~np.isfinite(values)).sum())} non-finite values (NaN/inf)")
    return labels.astype(np.float64), values


def grouped_auc(labels, scores, groups) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """AUC of every group at once: (auc [G], impressions [G], positives [G]), groups in sorted order.

    One lexsort by (group, score); within a group, the average 1-based rank of each tie block gives the
    Mann-Whitney statistic AUC = (sum of positive ranks - P(P+1)/2) / (P N). NaN where a class is absent.
    """
    y, s = _check_pair(labels, scores, "scores")
    g = np.asarray(groups)
    if g.shape != y.shape:
        raise MMRankError(f"groups {g.shape} must match labels {y.shape}")
    if y.size == 0:
        empty = np.zeros(0)
        return empty, empty, empty
    order = np.lexsort((s, g))
    g, s, y = g[order], s[order], y[order]
    n = len(y)
    new_group = np.ones(n, dtype=bool)
    new_group[1:] = g[1:] != g[:-1]
    new_block = new_group.copy()
    new_block[1:] |= s[1:] != s[:-1]
    group_start = np.flatnonzero(new_group)
    block_start = np.flatnonzero(new_block)
    block_end = np.append(block_start[1:], n)
    group_of = np.cumsum(new_group) - 1
    block_of = np.cumsum(new_block) - 1
    # Average 0-based position of each tie block, made relative to the group's first position.
    rank = (block_start + block_end - 1)[block_of] / 2.0 - group_start[group_of] + 1.0
    n_groups = len(group_start)
    impressions = np.bincount(group_of, minlength=n_groups).astype(np.float64)
    positives = np.bincount(group_of, weights=y, minlength=n_groups)
    rank_sum = np.bincount(group_of, weights=rank * y, minlength=n_groups)
    negatives = impressions - positives
    with np.errstate(divide="ignore", invalid="ignore"):
        auc_g = (rank_sum - positives * (positives + 1) / 2.0) / (positives * negatives)
    auc_g[(positives == 0) | (negatives == 0)] = np.nan
    return auc_g, impressions, positives


def auc(labels, scores) -> float:
    """ROC AUC with ties counted as half (equals sklearn's roc_auc_score); NaN if a class is absent."""
    labels = np.asarray(labels)
    values, _, _ = grouped_auc(labels, scores, np.zeros(labels.shape, dtype=np.int64))
    return float(values[0]) if values.size else math.nan


def gauc(labels, scores, groups) -> float:
    """Group AUC: per-group AUC weighted by the group's impressions, over groups with both classes.

    `groups` is the user id (per-user GAUC) or the request id (per-request GAUC); NaN if no group has
    both a positive and a negative.
    """
    values, impressions, _ = grouped_auc(labels, scores, groups)
    valid = ~np.isnan(values)
    if not valid.any():
        return math.nan
    return float(np.sum(values[valid] * impressions[valid]) / np.sum(impressions[valid]))


def logloss(labels, probs, eps: float = LOGLOSS_EPS) -> float:
    """Mean binary cross-entropy, probabilities clipped to [eps, 1 - eps] so a confident miss is finite."""
    y, p = _check_pair(labels, probs, "probs")
    if y.size == 0:
        return math.nan
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Column indices of each row's k highest scores, best first ([U, min(k, N)])."""
    scores = np.asarray(scores)
    k = min(k, scores.shape[1])
    idx = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    part = np.take_along_axis(scores, idx, axis=1)
    return np.take_along_axis(idx, np.argsort(-part, axis=1, kind="stable"), axis=1)


def _check_topk(scores, truth) -> tuple[np.ndarray, np.ndarray]:
    scores = np.asarray(scores, dtype=np.float64)
    truth = np.asarray(truth, dtype=bool)
    if scores.ndim != 2 or scores.shape != truth.shape:
        raise MMRankError(
            f"scores {scores.shape} and truth {truth.shape} must be 2-d [users, items], same shape"
        )
    if np.isnan(scores).any():
        raise MMRankError(f"scores contain {int(np.isnan(scores).sum())} NaN values")
    return scores, truth


def topk_metrics(scores, truth, ks: Sequence[int] = (10, 20)) -> dict[str, np.ndarray]:
    """Per-user Recall@K and NDCG@K for every K in `ks`, from one top-max(K) selection.

    scores: [U, N] (masked items at -inf); truth: [U, N] bool, the held-out items. Returns
    {"recall@K": [U], "ndcg@K": [U]}; users without held-out items get NaN.
    """
    scores, truth = _check_topk(scores, truth)
    k_max = max(ks)
    idx = top_k(scores, k_max)
    hits = np.zeros((scores.shape[0], k_max), dtype=np.float64)
    hits[:, : idx.shape[1]] = np.take_along_axis(truth, idx, axis=1)
    n_pos = truth.sum(axis=1)
    discount = 1.0 / np.log2(np.arange(2, k_max + 2))
    cum_hits = np.cumsum(hits, axis=1)
    cum_dcg = np.cumsum(hits * discount, axis=1)
    cum_ideal = np.concatenate([[0.0], np.cumsum(discount)])
    out = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for k in ks:
            out[f"recall@{k}"] = np.where(n_pos > 0, cum_hits[:, k - 1] / n_pos, np.nan)
            out[f"ndcg@{k}"] = np.where(
                n_pos > 0, cum_dcg[:, k - 1] / cum_ideal[np.minimum(n_pos, k)], np.nan
            )
    return out


def recall_at_k(scores, truth, k: int) -> float:
    """Mean over users with held-out items of (held-out items in the top k) / (held-out items)."""
    return float(np.nanmean(topk_metrics(scores, truth, (k,))[f"recall@{k}"]))


def ndcg_at_k(scores, truth, k: int) -> float:
    """Mean over users with held-out items of DCG@k / ideal DCG@k (binary gains, log2 discount)."""
    return float(np.nanmean(topk_metrics(scores, truth, (k,))[f"ndcg@{k}"]))


def ctr_metrics(labels, probs, users, requests=None, cold=None) -> dict[str, float | int | None]:
    """The per-split CTR block of metrics.json (docs/design.md, "Run folder and metrics"), JSON-ready:
    undefined values are None.

    users / requests: the group ids of per-user GAUC (`gauc`) and per-request GAUC (`gauc_request`);
    cold: bool mask of events whose item never appears in training (`cold_auc` over those).
    """
    labels = np.asarray(labels)
    probs = np.asarray(probs, dtype=np.float64)
    out: dict[str, float | int | None] = {
        "auc": auc(labels, probs),
        "gauc": gauc(labels, probs, users),
        "logloss": logloss(labels, probs),
        "n": int(labels.size),
        "positives": int(labels.sum()),
    }
    if requests is not None:
        out["gauc_request"] = gauc(labels, probs, requests)
    if cold is not None:
        cold = np.asarray(cold, dtype=bool)
        out["cold_auc"] = auc(labels[cold], probs[cold])
        out["cold_n"] = int(cold.sum())
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in out.items()}


# Plain references for the parity tests: O(P N) pair counting and one Python loop per group / user.


def auc_reference(labels, scores) -> float:
    labels = np.asarray(labels)
    scores = np.asarray(scores, dtype=np.float64)
    pos, neg = scores[labels == 1], scores[labels == 0]
    if len(pos) == 0 or len(neg) == 0:
        return math.nan
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return float(wins / (len(pos) * len(neg)))


def gauc_reference(labels, scores, groups) -> float:
    labels, scores, groups = np.asarray(labels), np.asarray(scores), np.asarray(groups)
    total = weight = 0.0
    for g in np.unique(groups):
        sel = groups == g
        value = auc_reference(labels[sel], scores[sel])
        if not math.isnan(value):
            total += value * sel.sum()
            weight += sel.sum()
    return total / weight if weight else math.nan


def topk_reference(scores, truth, k: int) -> tuple[float, float]:
    """(Recall@k, NDCG@k) with a full sort per user."""
    recalls, ndcgs = [], []
    for row, held in zip(np.asarray(scores), np.asarray(truth, dtype=bool), strict=True):
        n_pos = int(held.sum())
        if n_pos == 0:
            continue
        ranked = np.argsort(-row, kind="stable")[:k]
        gains = held[ranked]
        recalls.append(gains.sum() / n_pos)
        dcg = sum(1.0 / math.log2(r + 2) for r in range(len(ranked)) if gains[r])
        ideal = sum(1.0 / math.log2(r + 2) for r in range(min(n_pos, k)))
        ndcgs.append(dcg / ideal)
    return float(np.mean(recalls)), float(np.mean(ndcgs))
