"""Causal samples: each event's history is the last L positive items of its user strictly before its ts.

The history index is built once with sorts and binary searches (no Python loop over events); the dense
[B, L] history matrices are gathered per batch, so memory stays O(events) even for long histories.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from trainer.data.batch import Batch
from trainer.data.schema import PAD_ID, SPLITS, Dataset


@dataclass
class HistoryIndex:
    """Positives sorted by (user, ts) and, per query event, the slice [start, end) of its user's positives
    with ts strictly before the event."""

    pos_item: np.ndarray  # [P] item ids of positive events, sorted by (user, ts)
    start: np.ndarray  # [n] first positive of the event's user
    end: np.ndarray  # [n] one past the last positive with ts < event ts

    def gather(self, rows: np.ndarray, length: int) -> tuple[np.ndarray, np.ndarray]:
        """Right-aligned [len(rows), length] history ids (0 = padding) and mask."""
        end = self.end[rows][:, None]
        idx = end - length + np.arange(length)[None, :]
        mask = idx >= self.start[rows][:, None]
        if len(self.pos_item) == 0:
            return np.full(mask.shape, PAD_ID, dtype=np.int64), mask
        ids = np.where(mask, self.pos_item[np.clip(idx, 0, len(self.pos_item) - 1)], PAD_ID)
        return ids.astype(np.int64), mask


def build_history_index(
    hist_user: np.ndarray,
    hist_item: np.ndarray,
    hist_ts: np.ndarray,
    hist_label: np.ndarray,
    query_user: np.ndarray,
    query_ts: np.ndarray,
) -> HistoryIndex:
    """Index the positive events of (hist_*) for causal lookups by the events (query_*)."""
    pos = hist_label.astype(bool)
    p_user, p_ts, p_item = hist_user[pos], hist_ts[pos], hist_item[pos]
    order = np.lexsort((p_ts, p_user))
    p_user, p_ts, p_item = p_user[order], p_ts[order], p_item[order]
    # One sorted int64 key per (user, ts) turns "same user and earlier" into a single binary search.
    # Timestamps enter as their rank among all distinct times, not their value: user * (max ts) overflows
    # int64 for nanosecond times, and user * (distinct times) cannot for any log that fits in memory.
    times, rank = np.unique(np.concatenate([p_ts, query_ts]), return_inverse=True)
    span = len(times)
    p_key = p_user.astype(np.int64) * span + rank[: len(p_ts)]
    q_user = query_user.astype(np.int64)
    end = np.searchsorted(p_key, q_user * span + rank[len(p_ts) :], side="left")
    start = np.searchsorted(p_key, q_user * span, side="left")
    return HistoryIndex(p_item.astype(np.int64), start.astype(np.int64), end.astype(np.int64))


@dataclass
class SampleSet:
    """The events of one split with everything needed to make Batches."""

    user_id: np.ndarray
    item_id: np.ndarray
    label: np.ndarray
    request_id: np.ndarray
    ts: np.ndarray
    user_feats: np.ndarray  # [num_users + 1, U] lookup table
    history: HistoryIndex
    short_len: int
    long_len: int = 0

    def __len__(self) -> int:
        return len(self.item_id)

    def batch(self, rows: np.ndarray) -> Batch:
        hist, mask = self.history.gather(rows, self.short_len)
        long_hist = long_mask = None
        if self.long_len > 0:
            lh, lm = self.history.gather(rows, self.long_len)
            long_hist, long_mask = torch.from_numpy(lh), torch.from_numpy(lm)
        users = self.user_id[rows]
        return Batch(
            user_id=torch.from_numpy(users.astype(np.int64)),
            item_id=torch.from_numpy(self.item_id[rows].astype(np.int64)),
            label=torch.from_numpy(self.label[rows].astype(np.float32)),
            request_id=torch.from_numpy(self.request_id[rows].astype(np.int64)),
            user_feats=torch.from_numpy(self.user_feats[users].astype(np.int64)),
            hist_ids=torch.from_numpy(hist),
            hist_mask=torch.from_numpy(mask),
            long_hist_ids=long_hist,
            long_hist_mask=long_mask,
        )

    def order(self, epoch: int, seed: int, shuffle: bool) -> np.ndarray:
        """The row order of one epoch: a pure function of (seed, epoch), so a resumed run replays it."""
        if not shuffle:
            return np.arange(len(self))
        return np.random.default_rng([seed, epoch]).permutation(len(self))


def user_feature_table(ds: Dataset) -> np.ndarray:
    cols = list(ds.manifest.user_features)
    table = np.zeros((ds.num_users + 1, len(cols)), dtype=np.int64)
    if cols:
        table[ds.users["user_id"].to_numpy()] = ds.users[cols].to_numpy(dtype=np.int64)
    return table


def make_samples(
    ds: Dataset,
    split: str,
    short_len: int,
    long_len: int = 0,
    history_splits: tuple[str, ...] = ("train", "valid", "test"),
) -> SampleSet:
    """Samples for one split. Histories draw on positives of `history_splits` that precede each event;
    MMRec's top-K protocol passes ("train",) so users' held-out items never leak into histories."""
    ev = ds.events
    hist_ev = ev[ev["split"].isin([SPLITS[s] for s in history_splits])]
    q = ev[ev["split"] == SPLITS[split]]
    index = build_history_index(
        hist_ev["user_id"].to_numpy(),
        hist_ev["item_id"].to_numpy(),
        hist_ev["ts"].to_numpy(),
        hist_ev["label"].to_numpy(),
        q["user_id"].to_numpy(),
        q["ts"].to_numpy(),
    )
    return SampleSet(
        user_id=q["user_id"].to_numpy(),
        item_id=q["item_id"].to_numpy(),
        label=q["label"].to_numpy(),
        request_id=q["request_id"].to_numpy(),
        ts=q["ts"].to_numpy(),
        user_feats=user_feature_table(ds),
        history=index,
        short_len=short_len,
        long_len=long_len,
    )
