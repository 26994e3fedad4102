import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import MMRankError
from model_repository import item_table as it


def _table(n=5, d=3, e=2):
    rng = np.random.default_rng(0)
    content = rng.standard_normal((n + 1, d)).astype(np.float32)
    content[0] = 0
    return it.ItemTable(np.arange(n + 1), content, rng.standard_normal((n + 1, e)).astype(np.float32))


def _lookup(history_len=4, long_len=0):
    return it.LookupConfig(history_len, long_len, num_users=3, user_feature_cards=[3, 2])


def test_rows_of_maps_unknown_and_padding_ids_to_row_zero():
    table = _table()
    rows, known = table.rows_of(np.array([[3, 0, 99, -4, 5]]))
    assert rows.tolist() == [[3, 0, 0, 0, 5]]
    assert known.tolist() == [[True, False, False, False, True]]


def recent_known_reference(rows, known, length):
    """Per line: the known rows in order, last `length`, right-aligned."""
    out_rows = np.zeros((len(rows), length), np.int64)
    out_mask = np.zeros((len(rows), length), bool)
    for b in range(len(rows)):
        kept = [r for r, k in zip(rows[b], known[b], strict=True) if k][-length:] if length else []
        if kept:
            out_rows[b, length - len(kept) :] = kept
            out_mask[b, length - len(kept) :] = True
    return out_rows, out_mask


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(0, 9),
    st.integers(0, 6),
    st.sampled_from([0.0, 0.6, 1.0]),
    st.integers(0, 2**31 - 1),
)
def test_recent_known_matches_the_plain_loop(b, width, length, known_rate, seed):
    rng = np.random.default_rng(seed)
    rows = rng.integers(1, 50, (b, width))
    known = rng.random((b, width)) < known_rate
    got = it.recent_known(rows, known, length)
    want = recent_known_reference(rows, known, length)
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])


def test_rank_inputs_drop_unknown_history_items_and_flag_unknown_candidates():
    table = _table()
    out = it.rank_inputs(table, _lookup(), np.array([[1, 42, 2, 0, 3]]), np.array([[4, 77]]))
    assert out[it.HISTORY_MASK].tolist() == [[False, True, True, True]]
    np.testing.assert_array_equal(out[it.HISTORY_C][0, 1:], table.content[[1, 2, 3]])
    np.testing.assert_array_equal(out[it.HISTORY_C][0, 0], 0)
    assert out[it.CANDIDATE_KNOWN].tolist() == [[True, False]]
    np.testing.assert_array_equal(out[it.CANDIDATE_C][0, 1], table.content[0])
    np.testing.assert_array_equal(out[it.CANDIDATE_ITEM][0, 1], table.item_rows[0])
    assert it.LONG_HISTORY_C not in out


def test_rank_inputs_long_history_and_user_fallbacks():
    table = _table()
    out = it.rank_inputs(
        table,
        _lookup(2, 5),
        np.array([[1, 2, 3, 4]] * 2),
        np.array([[1], [2]]),
        user_id=np.array([2, 9]),
        user_feats=np.array([[2, 1], [5, -1]]),
    )
    assert out[it.HISTORY_MASK].tolist() == [[True, True]] * 2
    np.testing.assert_array_equal(out[it.HISTORY_C][0], table.content[[3, 4]])
    assert out[it.LONG_HISTORY_MASK].tolist() == [[False, True, True, True, True]] * 2
    assert out[it.USER_ID].tolist() == [2, 0]  # 9 > num_users -> unknown user
    assert out[it.USER_KNOWN].tolist() == [True, False]
    assert out[it.USER_FEATS].tolist() == [[2, 1], [0, 0]]  # out of cardinality -> unknown value
    defaults = it.rank_inputs(table, _lookup(), np.zeros((1, 0), np.int64), np.array([[1]]))
    assert defaults[it.USER_ID].tolist() == [0] and defaults[it.USER_FEATS].tolist() == [[0, 0]]
    assert defaults[it.USER_KNOWN].tolist() == [False]  # no user_id: scored as the unknown user
    assert not defaults[it.HISTORY_MASK].any()


def test_user_features_come_from_the_table_unless_the_request_sends_them(tmp_path):
    users = np.array([[0, 0], [2, 1], [1, 0], [2, 0]])
    table = _table()
    table = it.ItemTable(table.ids, table.content, table.item_rows, user_feats=users)
    table.write(tmp_path / "t")
    table = it.ItemTable.read(tmp_path / "t")
    hist, cands = np.array([[1, 2]] * 3), np.array([[3]] * 3)
    out = it.rank_inputs(table, _lookup(), hist, cands, user_id=np.array([1, 3, 7]))
    assert out[it.USER_FEATS].tolist() == [[2, 1], [2, 0], [0, 0]]  # 7 is unknown -> row 0
    sent = it.rank_inputs(table, _lookup(), hist, cands, np.array([1, 3, 7]), np.array([[1, 1]] * 3))
    assert sent[it.USER_FEATS].tolist() == [[1, 1]] * 3
    assert it.rank_inputs(table, _lookup(), hist, cands)[it.USER_FEATS].tolist() == [[0, 0]] * 3
    assert table.with_items(np.array([9]), np.ones((1, 3)), 2).user_feats is table.user_feats
    with pytest.raises(MMRankError, match="row 0"):
        it.ItemTable(table.ids, None, None, user_feats=np.ones((2, 2)))


def test_rank_inputs_reject_mismatched_shapes():
    with pytest.raises(MMRankError, match="must be"):
        it.rank_inputs(_table(), _lookup(), np.array([1, 2]), np.array([[1]]))


def test_with_items_appends_new_ids_with_the_fallback_item_row(tmp_path):
    table = _table()
    new = table.with_items(np.array([100, 2]), np.ones((2, 3)), version=2)
    assert new.version == 2 and new.ids.tolist() == [0, 1, 2, 3, 4, 5, 100]
    rows, known = new.rows_of(np.array([100, 2, 3]))
    assert known.all()
    np.testing.assert_array_equal(new.content[rows[:2]], 1.0)
    np.testing.assert_array_equal(new.content[rows[2]], table.content[3])
    np.testing.assert_array_equal(new.item_rows[rows[0]], table.item_rows[0])
    np.testing.assert_array_equal(new.item_rows[rows[1]], table.item_rows[2])
    with pytest.raises(MMRankError, match="positive and distinct"):
        table.with_items(np.array([0]), np.ones((1, 3)), 2)
    with pytest.raises(MMRankError, match="need content vectors"):
        table.with_items(np.array([100]), None, 2, item_rows=np.ones((1, table.item_dim)))


def test_with_items_takes_placed_item_rows_for_a_table_without_content():
    table = _table()
    two_tower = it.ItemTable(table.ids, None, table.item_rows)
    new = two_tower.with_items(np.array([100, 2]), None, 2, item_rows=np.full((2, table.item_dim), 7.0))
    rows, known = new.rows_of(np.array([100, 2, 3]))
    assert known.all() and new.content is None
    np.testing.assert_array_equal(new.item_rows[rows[:2]], 7.0)
    np.testing.assert_array_equal(new.item_rows[rows[2]], table.item_rows[3])
    with pytest.raises(MMRankError, match="no content vectors to update"):
        two_tower.with_items(np.array([100]), np.ones((1, 3)), 2)
    with pytest.raises(MMRankError, match="content vectors or item rows"):
        two_tower.with_items(np.array([100]), None, 2)


def test_write_read_round_trip_and_corrupt_files(tmp_path):
    table = _table()
    table.write(tmp_path / "t")
    back = it.ItemTable.read(tmp_path / "t")
    assert np.array_equal(back.ids, table.ids) and np.array_equal(back.content, table.content)
    assert np.array_equal(back.item_rows, table.item_rows) and back.version == 1
    (tmp_path / "t" / "content.npy").write_bytes(b"not numpy")
    with pytest.raises(MMRankError, match="unreadable item table"):
        it.ItemTable.read(tmp_path / "t")
    with pytest.raises(MMRankError, match="not an item table"):
        it.ItemTable.read(tmp_path / "missing")


def test_ids_must_start_with_padding_and_ascend():
    with pytest.raises(MMRankError, match="ascending"):
        it.ItemTable(np.array([0, 3, 2]), None, None)


def _npy_header(shape: tuple[int, ...]) -> bytes:
    """A .npy file of int64 `shape` with no data: what a lying or truncated header looks like."""
    header = f"{{'descr': '<i8', 'fortran_order': False, 'shape': {shape}, }}".ljust(117) + "\n"
    return b"\x93NUMPY\x01\x00" + len(header).to_bytes(2, "little") + header.encode()


def _meta(folder, **changes):
    meta = json.loads((folder / "table.json").read_text())
    meta.update(changes)
    return {k: v for k, v in meta.items() if v is not None}


CORRUPT = {
    "empty ids": ("ids.npy", b"", r"ids.npy: unreadable item table \(EOFError"),
    "huge shape": ("ids.npy", _npy_header((10**13,)), r"ids.npy: unreadable item table \("),
    "json list": ("table.json", "[]", "table.json: unreadable item table: a JSON list, expected an object"),
    "other format": (
        "table.json",
        {"format_version": 0},
        "item table format_version 0, this version reads 1",
    ),
    "no format": (
        "table.json",
        {"format_version": None},
        "item table format_version None, this version reads 1",
    ),
    "version x": ("table.json", {"version": "x"}, "version must be a non-negative integer, got 'x'"),
    "no d": ("table.json", {"d": None}, "d must be a non-negative integer, got None"),
    "rows": ("table.json", {"rows": 9}, "item table rows is 6, table.json says 9"),
    "2-d ids": ("ids.npy", np.arange(6).reshape(6, 1), r"item table ids have shape \(6, 1\)"),
    "float ids": (
        "ids.npy",
        np.arange(6.0),
        "ids.npy: unreadable item table: dtype float64, expected integers",
    ),
    "short content": (
        "content.npy",
        np.ones((5, 3), np.float32),
        r"content has shape \(5, 3\), expected \[6",
    ),
    "NaN": ("content.npy", "nan", "content has NaN or infinite values in 1 rows .the first at item id 4."),
    "inf": ("item_rows.npy", "inf", "item_rows has NaN or infinite values in 1 rows"),
}


@pytest.mark.parametrize("case", CORRUPT)
def test_any_broken_table_file_is_an_error_naming_the_file(tmp_path, case):
    table = _table()
    folder = table.write(tmp_path / "t")
    name, value, message = CORRUPT[case]
    if isinstance(value, dict):
        (folder / name).write_text(json.dumps(_meta(folder, **value)))
    elif isinstance(value, np.ndarray):
        np.save(folder / name, value)
    elif value in ("nan", "inf"):
        array = np.load(folder / name)
        array[4, 1] = float(value)
        np.save(folder / name, array)
    else:
        (folder / name).write_bytes(value if isinstance(value, bytes) else value.encode())
    with pytest.raises(MMRankError, match=message) as e:
        it.ItemTable.read(folder)
    assert str(folder) in str(e.value)


def test_tables_with_non_finite_values_are_refused():
    table = _table()
    content = table.content.copy()
    content[2, 0] = np.nan
    with pytest.raises(MMRankError, match="item table content has NaN or infinite values in 1 rows"):
        it.ItemTable(table.ids, content, table.item_rows)
    table.item_rows[3, 1] = -np.inf  # changed after it was built
    with pytest.raises(MMRankError, match="item_rows has NaN or infinite values .* item id 3"):
        table.check_finite()
