"""The causal history builder against a per-event Python reference, on random event logs."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.data.samples import build_history_index


def reference_history(user, item, ts, label, q_user, q_ts, length):
    rows = []
    for u, t in zip(q_user, q_ts, strict=True):
        sel = (user == u) & (ts < t) & (label == 1)
        order = np.lexsort((ts[sel],))  # stable on ties, like the lexsort in the index
        items = item[sel][order][-length:] if length else item[sel][:0]
        rows.append(np.concatenate([np.zeros(length - len(items), dtype=np.int64), items]))
    return np.array(rows, dtype=np.int64).reshape(len(q_user), length)


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 60),
    users=st.integers(1, 5),
    length=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
)
def test_history_matches_reference_and_is_causal(n, users, length, seed):
    rng = np.random.default_rng(seed)
    user = rng.integers(1, users + 1, n)
    item = rng.integers(1, 50, n)
    ts = rng.integers(0, 20, n)  # few distinct timestamps: ties must not leak into histories
    label = rng.integers(0, 2, n)
    index = build_history_index(user, item, ts, label, user, ts)
    ids, mask = index.gather(np.arange(n), length)
    # Sort positives the same way the index does so that ties resolve identically.
    order = np.lexsort((ts, user))
    u2, i2, t2, l2 = user[order], item[order], ts[order], label[order]
    expected = reference_history(u2, i2, t2, l2, user, ts, length)
    np.testing.assert_array_equal(ids, expected)
    np.testing.assert_array_equal(mask, expected != 0)
    # Causality: every history item comes from a positive of the same user strictly earlier.
    for row in range(n):
        for it in ids[row][mask[row]]:
            assert ((user == user[row]) & (item == it) & (ts < ts[row]) & (label == 1)).any()


def test_empty_histories_are_all_padding():
    user = np.array([1, 2, 3])
    ts = np.array([5, 5, 5])
    index = build_history_index(user, np.array([7, 8, 9]), ts, np.array([0, 0, 0]), user, ts)
    ids, mask = index.gather(np.arange(3), 4)
    assert (ids == 0).all() and not mask.any()


def test_right_aligned_most_recent_last():
    user = np.array([1, 1, 1, 1])
    item = np.array([10, 11, 12, 13])
    ts = np.array([1, 2, 3, 4])
    label = np.ones(4, dtype=np.int64)
    index = build_history_index(user, item, ts, label, np.array([1]), np.array([10]))
    ids, mask = index.gather(np.array([0]), 3)
    assert ids.tolist() == [[11, 12, 13]]
    ids, mask = index.gather(np.array([0]), 6)
    assert ids.tolist() == [[0, 0, 10, 11, 12, 13]]
    assert mask.tolist() == [[False, False, True, True, True, True]]
