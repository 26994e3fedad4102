"""The MMRec-format loader: id remap, re-indexed item features, sampled negatives, ordering, bad inputs."""

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import DataError, MMRankError
from mmrank.cli import main
from trainer.data.mmrec import MMRecConfig, build_mmrec, nth_uninteracted, nth_uninteracted_reference
from trainer.data.schema import load_dataset

USERS, ITEMS, PER_USER = 12, 30, 7  # raw ids 0..11 and 0..29
NEVER = 10  # a raw item no row uses: it still gets an item id, as its feature row is positional


def _rows(seed: int = 0) -> pd.DataFrame:
    """Each user: PER_USER distinct items, the first 5 in train, one in valid, one in test, later = larger ts."""
    rng = np.random.default_rng(seed)
    pool = np.array([i for i in range(ITEMS - 1) if i != NEVER])
    rows = []
    for u in range(USERS):
        items = rng.choice(pool, PER_USER, replace=False)
        if u == 0:
            items[-1] = ITEMS - 1  # the largest raw id occurs, so the .inter defines ITEMS raw items
        for k, i in enumerate(items):
            rows.append((u, int(i), 5.0, 1_000 + 100 * k - u, 0 if k < 5 else k - 4))
    frame = pd.DataFrame(rows, columns=["userID", "itemID", "rating", "timestamp", "x_label"])
    return frame.sample(frac=1.0, random_state=seed)  # file order is not time order


def write_source(root: Path, rows: pd.DataFrame | None = None, name: str = "toy") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (rows if rows is not None else _rows()).to_csv(root / f"{name}.inter", sep="\t", index=False)
    rng = np.random.default_rng(1)
    np.save(root / "image_feat.npy", rng.normal(size=(ITEMS, 5)).astype(np.float32))
    np.save(root / "text_feat.npy", rng.normal(size=(ITEMS, 3)))
    return root


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return write_source(tmp_path_factory.mktemp("mmrec") / "src")


@pytest.fixture(scope="module")
def ds(src, tmp_path_factory):
    out = tmp_path_factory.mktemp("mmrec_out") / "ds"
    build_mmrec(src, out, MMRecConfig(name="toy", neg_ratio=3, seed=5))
    return load_dataset(out)


def test_ids_counts_and_protocol(ds):
    m = ds.manifest
    assert m.topk_protocol and m.text_fields == [] and not m.has_images and m.source == "mmrec"
    assert (m.counts["items"], m.counts["users"]) == (ITEMS, USERS)
    assert m.counts["interactions"] == USERS * PER_USER
    assert ds.items["item_id"].tolist() == list(range(1, ITEMS + 1))
    assert ds.items["raw_id"].tolist() == list(range(ITEMS))
    assert ds.users["raw_id"].tolist() == list(range(USERS))
    raw = _rows()
    assert m.counts["items_without_interactions"] == ITEMS - raw["itemID"].nunique() >= 1
    assert ds.items.loc[NEVER, "created_at"] == 0
    for name, code in (("train", 0), ("valid", 1), ("test", 2)):
        part = ds.split(name)
        assert (
            m.counts[f"{name}_positives"]
            == int((part["label"] == 1).sum())
            == int((raw["x_label"] == code).sum())
        )
    pos = ds.events[ds.events["label"] == 1]
    got = set(zip(pos["user_id"] - 1, pos["item_id"] - 1, pos["split"], strict=True))
    assert got == set(zip(raw["userID"], raw["itemID"], raw["x_label"], strict=True))
    assert (ds.split("valid")["label"] == 1).all() and (ds.split("test")["label"] == 1).all()


def test_item_features_are_reindexed_with_a_padding_row(ds, src):
    for name in ("image_feat", "text_feat"):
        original = np.load(src / f"{name}.npy")
        copied = ds.item_feature(name)
        assert ds.manifest.item_features[name] == f"item_features/{name}.npy"
        assert copied.shape == (ds.num_items + 1, original.shape[1]) and copied.dtype == original.dtype
        assert not copied[0].any()
        np.testing.assert_array_equal(copied[1:], original)


def _pairs(frame: pd.DataFrame) -> set[tuple[int, int]]:
    return set(zip(frame["user_id"], frame["item_id"], strict=True))


def test_negatives_are_items_outside_the_users_train_positives_in_their_request(ds):
    train = ds.split("train")
    pos, neg = train[train["label"] == 1], train[train["label"] == 0]
    assert len(neg) == 3 * len(pos) == ds.manifest.counts["train_negatives"]
    assert not _pairs(pos) & _pairs(neg)
    assert pos["request_id"].is_unique
    joined = neg.merge(pos, on="request_id", suffixes=("", "_pos"))
    assert len(joined) == len(neg)
    assert (joined["user_id"] == joined["user_id_pos"]).all() and (joined["ts"] == joined["ts_pos"]).all()


def test_held_out_positives_stay_eligible_as_train_negatives(ds):
    """As in MMRec and the trainer's NegativeSampler, only train positives are excluded: excluding valid
    and test positives too would make the training negatives depend on the held-out splits."""
    neg = ds.split("train")[lambda d: d["label"] == 0]
    held_out = ds.events[ds.events["split"] > 0]
    # 15 draws per user from 25 eligible items that include its 2 held-out ones: seed 5 draws some.
    assert _pairs(neg) & _pairs(held_out)


def test_order_train_before_valid_before_test(ds):
    ev, s = ds.events, ds.manifest.splits
    train = ev[ev["split"] == 0]
    assert train["ts"].max() < s["valid_start_ts"] == ev.loc[ev["split"] == 1, "ts"].min()
    assert ev.loc[ev["split"] == 1, "ts"].max() < s["test_start_ts"] == ev.loc[ev["split"] == 2, "ts"].min()
    assert ev.loc[ev["split"] == 1, "ts"].nunique() == 1 and ev.loc[ev["split"] == 2, "ts"].nunique() == 1
    # Train positives are numbered in timestamp order: a user's ts order equals the raw timestamp order.
    raw = _rows().rename(columns={"userID": "u", "itemID": "i"})
    pos = train[train["label"] == 1].assign(u=lambda d: d["user_id"] - 1, i=lambda d: d["item_id"] - 1)
    merged = pos.merge(raw, on=["u", "i"]).sort_values("ts")
    assert (merged.groupby("u")["timestamp"].apply(lambda t: t.is_monotonic_increasing)).all()
    held_out = ev[ev["split"] > 0]
    assert held_out.groupby("request_id")["user_id"].nunique().eq(1).all()
    assert held_out.groupby(["split", "user_id"]).ngroups == held_out["request_id"].nunique()


def test_same_seed_same_events_other_seed_differs(ds, src, tmp_path):
    build_mmrec(src, tmp_path / "again", MMRecConfig(name="toy", neg_ratio=3, seed=5))
    pd.testing.assert_frame_equal(load_dataset(tmp_path / "again").events, ds.events)
    build_mmrec(src, tmp_path / "other", MMRecConfig(name="toy", neg_ratio=3, seed=6))
    assert not load_dataset(tmp_path / "other").events.equals(ds.events)


def test_without_timestamp_the_file_order_numbers_train(tmp_path):
    rows = _rows().drop(columns=["timestamp", "rating"])
    build_mmrec(write_source(tmp_path / "src", rows), tmp_path / "ds", MMRecConfig(name="toy", neg_ratio=0))
    out = load_dataset(tmp_path / "ds")
    train = out.split("train").sort_values("ts")
    expected = rows[rows["x_label"] == 0]
    assert (train["user_id"] - 1).tolist() == expected["userID"].tolist()
    assert (train["item_id"] - 1).tolist() == expected["itemID"].tolist()
    assert train["ts"].tolist() == list(range(len(expected)))
    assert out.manifest.notes["ts_order"] == "file line" and out.manifest.counts["train_negatives"] == 0


def test_cli(src, tmp_path, capsys):
    out = tmp_path / "ds"
    assert (
        main(["data", "mmrec", "--src", str(src), "--name", "toy", "--out", str(out), "--neg-ratio", "2"])
        == 0
    )
    assert "image_feat, text_feat" in capsys.readouterr().out
    assert load_dataset(out).manifest.counts["train_negatives"] == 2 * 5 * USERS
    assert main(["data", "mmrec", "--src", str(src), "--name", "nope", "--out", str(tmp_path / "x")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nope.inter: missing file" in err[0]
    with pytest.raises(MMRankError):
        MMRecConfig(name="../toy")


def test_force_never_replaces_the_source_folder(tmp_path):
    src = write_source(tmp_path / "parent" / "src")
    for out in (src, src.parent):
        with pytest.raises(DataError, match="would replace the input"):
            build_mmrec(src, out, MMRecConfig(name="toy"), force=True)
    assert sorted(p.name for p in src.iterdir()) == ["image_feat.npy", "text_feat.npy", "toy.inter"]


def test_a_negative_seed_is_one_line_naming_the_option(src, tmp_path, capsys):
    argv = [
        "data",
        "mmrec",
        "--src",
        str(src),
        "--name",
        "toy",
        "--out",
        str(tmp_path / "ds"),
        "--seed",
        "-1",
    ]
    assert main(argv) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--seed must be a non-negative integer, got -1" in err[0]
    assert not (tmp_path / "ds").exists()


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 6), st.integers(0, 2**31))
def test_nth_uninteracted_matches_the_reference(num_items, num_users, seed):
    rng = np.random.default_rng(seed)
    seen = rng.random((num_users, num_items)) < rng.random()
    seen[:, rng.integers(num_items)] = False  # every user has at least one unseen item
    seen_user, seen_item = np.nonzero(seen)
    user = rng.integers(0, num_users, 50)
    rank = (rng.random(50) * (num_items - seen.sum(axis=1)[user])).astype(np.int64)
    fast = nth_uninteracted(seen_user, seen_item, num_items, user, rank)
    np.testing.assert_array_equal(
        fast, nth_uninteracted_reference(seen_user, seen_item, num_items, user, rank)
    )


def _edit_inter(edit):
    def apply(root: Path):
        rows = edit(_rows())
        rows.to_csv(root / "toy.inter", sep="\t", index=False)

    return apply


def _set(row: int, column: str, value):
    def edit(rows: pd.DataFrame):
        rows[column] = rows[column].astype(object)
        rows.iloc[row, rows.columns.get_loc(column)] = value
        return rows

    return _edit_inter(edit)


def _write_line(text: str, line: int):
    def apply(root: Path):
        lines = (root / "toy.inter").read_text().split("\n")
        lines[line - 1] = text
        (root / "toy.inter").write_text("\n".join(lines))

    return apply


def _save(name: str, values):
    return lambda root: np.save(root / name, values, allow_pickle=True)


def _duplicate_line(line: int):
    def apply(root: Path):
        lines = (root / "toy.inter").read_text().split("\n")
        lines[line] = lines[line - 1]
        (root / "toy.inter").write_text("\n".join(lines))

    return apply


NAN_ROW = np.ones((ITEMS, 5), np.float32)
NAN_ROW[7, 2] = np.nan
BAD_INPUTS = {
    "missing x_label header": (
        _edit_inter(lambda r: r.rename(columns={"x_label": "split"})),
        "toy.inter",
        "x_label",
        1,
        "missing header column",
    ),
    "non-integer itemID": (_set(3, "itemID", "12a"), "toy.inter", "itemID", 5, "not an integer"),
    "float userID": (_set(0, "userID", "1.5"), "toy.inter", "userID", 2, "not an integer"),
    "x_label out of range": (_set(8, "x_label", 3), "toy.inter", "x_label", 10, "outside [0, 2]"),
    "negative id": (_set(2, "userID", -1), "toy.inter", "userID", 4, "outside"),
    "non-numeric timestamp": (
        _set(6, "timestamp", "yesterday"),
        "toy.inter",
        "timestamp",
        8,
        "not a finite number",
    ),
    "duplicate interaction": (_duplicate_line(2), "toy.inter", "userID, itemID", 3, "(first on line 2)"),
    "too many columns": (_write_line("0\t1\t5.0\t1\t0\t9", 6), "toy.inter", None, 6, "6 '\\t'-separated"),
    "empty test split": (
        _edit_inter(lambda r: r[r["x_label"] != 2]),
        "toy.inter",
        "x_label",
        None,
        "split 'test' is empty",
    ),
    "feature rows": (
        _save("image_feat.npy", np.ones((ITEMS + 1, 5))),
        "image_feat.npy",
        None,
        None,
        "31 rows",
    ),
    "feature not 2-D": (_save("text_feat.npy", np.ones(ITEMS)), "text_feat.npy", None, None, "2-D numeric"),
    "feature of objects": (
        _save("text_feat.npy", np.array([None] * ITEMS)),
        "text_feat.npy",
        None,
        None,
        "unreadable .npy",
    ),
    "feature not finite": (_save("image_feat.npy", NAN_ROW), "image_feat.npy", None, 7, "non-finite"),
    "feature not npy": (
        lambda r: (r / "image_feat.npy").write_bytes(b"garbage"),
        "image_feat.npy",
        None,
        None,
        "unreadable .npy",
    ),
    "missing inter": (lambda r: (r / "toy.inter").unlink(), "toy.inter", None, None, "missing file"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_raises_one_error_and_keeps_the_old_output(case, src, tmp_path):
    corrupt, file, column, row, message = BAD_INPUTS[case]
    bad = tmp_path / "src"
    shutil.copytree(src, bad)
    corrupt(bad)
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("old")
    with pytest.raises(DataError) as info:
        build_mmrec(bad, out, MMRecConfig(name="toy"), force=True)
    e = info.value
    assert (Path(e.path).name, e.column, e.row) == (file, column, row), str(e)
    assert message in str(e)
    assert {p.name for p in tmp_path.iterdir()} == {"src", "out"}
    assert [p.name for p in out.iterdir()] == ["keep.txt"] and (out / "keep.txt").read_text() == "old"


def test_a_user_who_trained_on_every_item_cannot_get_negatives(tmp_path):
    rows = pd.DataFrame(
        {"userID": [0, 0, 0, 1, 1, 1], "itemID": [0, 1, 2, 0, 1, 2], "x_label": [0, 0, 0, 0, 1, 2]}
    )
    rows.to_csv(tmp_path / "all.inter", sep="\t", index=False)
    with pytest.raises(DataError, match="user 0 has a train interaction with every item") as info:
        build_mmrec(tmp_path, tmp_path / "out", MMRecConfig(name="all"))
    assert (info.value.column, info.value.row) == ("userID", 2)
    build_mmrec(tmp_path, tmp_path / "out", MMRecConfig(name="all", neg_ratio=0))
    assert load_dataset(tmp_path / "out").manifest.counts["events"] == 6


def test_a_user_whose_only_free_items_are_held_out_gets_them_as_negatives(tmp_path):
    rows = pd.DataFrame({"userID": [0, 0, 0, 1], "itemID": [0, 1, 2, 0], "x_label": [0, 1, 2, 0]})
    rows.to_csv(tmp_path / "held.inter", sep="\t", index=False)
    build_mmrec(tmp_path, tmp_path / "out", MMRecConfig(name="held", neg_ratio=4))
    neg = load_dataset(tmp_path / "out").events[lambda d: d["label"] == 0]
    drawn = neg.loc[neg["user_id"] == 1, "item_id"]
    assert len(drawn) == 4 and set(drawn) <= {2, 3}  # raw items 1 (valid) and 2 (test)
