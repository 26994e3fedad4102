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
    users=st.integers(1, 9),
    length=st.integers(1, 8),
    seed=st.integers(0, 2**31 - 1),
    # Seconds, nanoseconds (2023 in ns is 1.7e18: user * ts overflows int64 from user 6 on), negative.
    t0=st.sampled_from([0, 1_700_000_000, 1_700_000_000_000_000_000, -(2**62)]),
)
def test_history_matches_reference_and_is_causal(n, users, length, seed, t0):
    rng = np.random.default_rng(seed)
    user = rng.integers(1, users + 1, n)
    item = rng.integers(1, 50, n)
    ts = t0 + rng.integers(0, 20, n)  # few distinct timestamps: ties must not leak into histories
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


def test_nanosecond_timestamps_keep_users_apart():
    """The review's case: users 1 and 7 at nanosecond times; user 7's keys overflowed into user 1's."""
    ns = 1_700_000_000_000_000_000
    user = np.array([1, 1, 7, 7])
    ts = np.array([ns, ns + 1, ns, ns + 1])
    index = build_history_index(user, np.array([10, 11, 20, 21]), ts, np.ones(4, dtype=np.int64), user, ts)
    ids, _ = index.gather(np.arange(4), 3)
    assert ids.tolist() == [[0, 0, 0], [0, 0, 10], [0, 0, 0], [0, 0, 20]]
