"""Canonical-form validation on hand-made tiny datasets: each defect gives one DataError naming file,
column and row; atomic_dir never loses what was there."""

import io
import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from image_bytes import jpeg_claiming, png
from PIL import Image

from common.atomic import atomic_dir
from common.errors import DataError
from trainer.data.schema import EVENTS, MANIFEST, Manifest, load_dataset, read_events, write_events
from trainer.data.synth import SynthConfig, generate


def _jpeg(seed: int) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 255, (32, 32, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG")
    return buf.getvalue()


def _items() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "item_id": [1, 2, 3],
            "created_at": [10, 20, 30],
            "title": ["a red box", "a blue ball", "a green cone"],
            "image": pd.Series([_jpeg(1), None, _jpeg(3)], dtype=object),
            "category": [1, 0, 2],
        }
    )


def _users() -> pd.DataFrame:
    return pd.DataFrame({"user_id": [1, 2], "age": [1, 2]})


def _events() -> pd.DataFrame:
    return pd.DataFrame(
        {
            "user_id": [1, 2, 1, 2, 1, 2],
            "item_id": [1, 2, 3, 1, 2, 3],
            "label": np.array([1, 0, 1, 1, 0, 1], np.int8),
            "ts": [100, 110, 200, 210, 300, 310],
            "request_id": [1, 2, 3, 4, 5, 6],
            "split": np.array([0, 0, 1, 1, 2, 2], np.int8),
        }
    )


def _manifest(**changes) -> Manifest:
    fields = dict(
        name="tiny",
        source="hand",
        seed=None,
        label_rule="hand-made",
        counts={"items": 3, "users": 2, "events": 6},
        splits={"valid_start_ts": 200, "test_start_ts": 300},
        text_fields=["title"],
        item_categoricals={"category": 3},
        user_features={"age": 3},
        has_images=True,
    )
    return Manifest(**{**fields, **changes})


def write(root: Path, items=None, users=None, events=None, manifest=None, features=None) -> Path:
    """Write a dataset folder without any checks, so defects reach the validator."""
    root.mkdir(parents=True)
    pq.write_table(
        pa.Table.from_pandas(_items() if items is None else items, preserve_index=False),
        root / "items.parquet",
    )
    pq.write_table(
        pa.Table.from_pandas(_users() if users is None else users, preserve_index=False),
        root / "users.parquet",
    )
    events = _events() if events is None else events
    (root / "events").mkdir()
    pq.write_table(pa.Table.from_pandas(events, preserve_index=False), root / "events" / "part-00000.parquet")
    manifest = manifest or _manifest()
    for name, values in (features or {}).items():
        (root / "item_features").mkdir(exist_ok=True)
        np.save(root / "item_features" / f"{name}.npy", values)
        manifest.item_features[name] = f"item_features/{name}.npy"
    (root / MANIFEST).write_text(manifest.to_json())
    return root


def test_a_well_formed_dataset_loads(tmp_path):
    features = {"clip": np.vstack([np.zeros(4), np.ones((3, 4))]).astype(np.float32)}
    ds = load_dataset(write(tmp_path / "ds", features=features))
    assert ds.num_items == 3 and ds.num_users == 2 and len(ds.events) == 6
    assert ds.events["ts"].is_monotonic_increasing
    assert ds.item_feature("clip").shape == (4, 4)


def test_a_null_text_is_allowed(tmp_path):
    items = _items().assign(title=pd.Series(["a red box", None, "a green cone"], dtype=object))
    ds = load_dataset(write(tmp_path / "ds", items=items))
    assert ds.items["title"].isna().tolist() == [False, True, False]


def _truncated(blob: bytes) -> bytes:
    """Headers intact, scan data cut: PIL's verify() passes this, only a full decode fails."""
    return blob[: len(blob) * 3 // 4]


BAD = {
    "missing text column": (
        dict(items=_items().drop(columns="title")),
        "items.parquet",
        "title",
        None,
        "missing column",
    ),
    "text of numbers": (
        dict(items=_items().assign(title=[1, 2, 3])),
        "items.parquet",
        "title",
        None,
        "expected text",
    ),
    "text stored as bytes": (
        dict(items=_items().assign(title=pd.Series(["a", b"b", "c"], dtype=object))),  # Parquet: all binary
        "items.parquet",
        "title",
        0,
        "not a string",
    ),
    "float label": (
        dict(events=_events().astype({"label": float})),
        "events",
        "label",
        None,
        "expected an integer",
    ),
    "missing request_id": (
        dict(events=_events().drop(columns="request_id")),
        "events",
        "request_id",
        None,
        "missing column",
    ),
    "duplicate item id": (
        dict(items=_items().assign(item_id=[1, 3, 3])),
        "items.parquet",
        "item_id",
        1,
        "duplicate id 3",
    ),
    "item id out of range": (
        dict(items=_items().assign(item_id=[1, 2, 4])),
        "items.parquet",
        "item_id",
        2,
        "out of range [1, 3]",
    ),
    "duplicate user id": (
        dict(users=_users().assign(user_id=[2, 2])),
        "users.parquet",
        "user_id",
        0,
        "duplicate id 2",
    ),
    "event on an unknown item": (
        dict(events=_events().assign(item_id=[1, 2, 3, 1, 7, 3])),
        "part-00000.parquet",
        "item_id",
        4,
        "id 7 out of range",
    ),
    "event of an unknown user": (
        dict(events=_events().assign(user_id=[1, 2, 0, 2, 1, 2])),
        "part-00000.parquet",
        "user_id",
        2,
        "id 0 out of range",
    ),
    "label 2": (
        dict(events=_events().assign(label=np.array([1, 0, 2, 1, 0, 1], np.int8))),
        "part-00000.parquet",
        "label",
        2,
        "out of range [0, 1]",
    ),
    "categorical past its cardinality": (
        dict(items=_items().assign(category=[1, 3, 2])),
        "items.parquet",
        "category",
        1,
        "out of range [0, 2]",
    ),
    "user feature past its cardinality": (
        dict(users=_users().assign(age=[3, 1])),
        "users.parquet",
        "age",
        0,
        "out of range [0, 2]",
    ),
    "row count differs from the manifest": (
        dict(manifest=_manifest(counts={"items": 4, "users": 2})),
        "items.parquet",
        None,
        None,
        "manifest says 4 items",
    ),
    "truncated jpeg": (
        dict(items=_items().assign(image=pd.Series([_jpeg(1), None, _truncated(_jpeg(3))], dtype=object))),
        "items.parquet",
        "image",
        2,
        "unreadable image",
    ),
    "not an image": (
        dict(items=_items().assign(image=pd.Series([b"nope", None, None], dtype=object))),
        "items.parquet",
        "image",
        0,
        "unreadable image",
    ),
    "a header of 20000 x 20000 pixels": (
        dict(
            items=_items().assign(
                image=pd.Series([_jpeg(1), jpeg_claiming(20000, 20000), None], dtype=object)
            )
        ),
        "items.parquet",
        "image",
        1,
        "unreadable image (DecompressionBombError",
    ),
    "an image the encoder refuses": (
        dict(items=_items().assign(image=pd.Series([None, None, png(21, 1)], dtype=object))),
        "items.parquet",
        "image",
        2,
        "image is 21 x 1 pixels, an aspect ratio over the limit of 20:1",
    ),
    "image paths instead of bytes": (
        dict(items=_items().assign(image=["posters/1.jpg", None, "posters/3.jpg"])),
        "items.parquet",
        "image",
        0,
        "a str, expected encoded image bytes or null",
    ),
    "empty test split": (
        dict(events=_events().assign(split=np.array([0, 0, 1, 1, 1, 1], np.int8))),
        "events",
        "split",
        None,
        "split 'test' is empty",
    ),
    "earliest event relabelled test": (
        dict(events=_events().assign(split=np.array([2, 0, 1, 1, 2, 2], np.int8))),
        "part-00000.parquet",
        "split",
        0,
        "split 'test' at ts 100, but the manifest's boundaries (valid_start_ts 200, test_start_ts 300) "
        "put that time in 'train'",
    ),
    "valid label in test time": (
        dict(events=_events().assign(split=np.array([0, 0, 1, 1, 1, 2], np.int8))),
        "part-00000.parquet",
        "split",
        4,
        "split 'valid' at ts 300",
    ),
    "valid label in train time": (
        dict(events=_events().assign(split=np.array([0, 1, 0, 1, 2, 2], np.int8))),
        "part-00000.parquet",
        "split",
        1,
        "put that time in 'train'",
    ),
    "no split boundaries": (
        dict(manifest=_manifest(splits={})),
        "manifest.json",
        None,
        None,
        "splits.valid_start_ts is None, expected an integer timestamp",
    ),
    "split boundaries out of order": (
        dict(manifest=_manifest(splits={"valid_start_ts": 300, "test_start_ts": 200})),
        "manifest.json",
        None,
        None,
        "valid_start_ts 300 must be < test_start_ts 200",
    ),
    "feature rows": (dict(features={"clip": np.zeros((3, 4))}), "clip.npy", None, None, "expected 4 rows"),
    "feature padding": (
        dict(features={"clip": np.ones((4, 4))}),
        "clip.npy",
        None,
        0,
        "padding row is not zero",
    ),
}


@pytest.mark.parametrize("case", list(BAD))
def test_a_defect_raises_one_error_naming_file_column_row(case, tmp_path):
    parts, file, column, row, message = BAD[case]
    with pytest.raises(DataError) as info:
        load_dataset(write(tmp_path / "ds", **parts))
    e = info.value
    assert (Path(e.path).name, e.column, e.row) == (file, column, row), str(e)
    assert message in str(e)


def test_held_out_labels_on_the_earliest_events_are_refused(tmp_path):
    """The review's leak: the earliest 5% of a generated dataset relabelled test would have put test
    positives into training histories."""
    root = tmp_path / "synth"
    generate(root, SynthConfig(users=50, items=40, events=3000, seed=0))
    events = read_events(root)
    early = events["ts"].to_numpy() < np.quantile(events["ts"], 0.05)
    shutil.rmtree(root / EVENTS)
    write_events(root, events.assign(split=np.where(early, 2, events["split"]).astype(np.int8)))
    with pytest.raises(DataError, match="split 'test' at ts .* put that time in 'train'") as info:
        load_dataset(root)
    assert (info.value.column, info.value.row) == ("split", int(np.flatnonzero(early)[0]))


def test_a_missing_feature_file_is_named(tmp_path):
    root = write(tmp_path / "ds", features={"clip": np.zeros((4, 2))})
    (root / "item_features" / "clip.npy").unlink()
    with pytest.raises(DataError, match="missing item feature file 'clip'"):
        load_dataset(root)


def test_manifest_problems(tmp_path):
    with pytest.raises(DataError, match="no manifest"):
        load_dataset(tmp_path)
    root = write(tmp_path / "ds")
    raw = json.loads((root / MANIFEST).read_text())
    (root / MANIFEST).write_text(json.dumps({**raw, "schema_version": 99}))
    with pytest.raises(DataError, match="schema_version 99"):
        load_dataset(root)
    (root / MANIFEST).write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        load_dataset(root)
    (root / MANIFEST).write_text(json.dumps({**raw, "colour": "red"}))
    with pytest.raises(DataError, match="do not match the schema"):
        load_dataset(root)
    (root / MANIFEST).write_text(json.dumps({**raw, "counts": {"users": 2}}))
    with pytest.raises(DataError, match=r"manifest.json: counts.items is None, expected a non-negative"):
        Manifest.read(root)
    (root / MANIFEST).write_text(json.dumps({**raw, "counts": {"items": 3, "users": "2"}}))
    with pytest.raises(DataError, match=r"counts.users is '2'"):
        Manifest.read(root)


def test_a_column_of_null_images_is_allowed(tmp_path):
    ds = load_dataset(
        write(tmp_path / "ds", items=_items().assign(image=pd.Series([None] * 3, dtype=object)))
    )
    assert ds.items["image"].isna().all()


def test_an_event_error_names_the_part_and_its_row(tmp_path):
    """Not the events folder and the row of all parts together (row 16389 here)."""
    root = tmp_path / "synth"
    generate(root, SynthConfig(users=50, items=40, events=30_000, seed=0, chunk_events=8192))
    part = root / EVENTS / "part-00002.parquet"
    events = pq.read_table(part).to_pandas()
    assert len(read_events(root)) > 2 * len(events)  # part 2 is in the middle
    events.loc[5, "label"] = 3
    pq.write_table(pa.Table.from_pandas(events, preserve_index=False), part)
    with pytest.raises(DataError, match="id 3 out of range") as info:
        load_dataset(root)
    assert (Path(info.value.path), info.value.column, info.value.row) == (part, "label", 5)


def test_event_parts_with_other_columns_are_named(tmp_path):
    root = tmp_path / "synth"
    generate(root, SynthConfig(users=50, items=40, events=30_000, seed=0, chunk_events=8192))
    part = root / EVENTS / "part-00001.parquet"
    pq.write_table(pq.read_table(part).drop_columns("request_id"), part)
    with pytest.raises(DataError, match="differ from part-00000.parquet's") as info:
        load_dataset(root)
    assert Path(info.value.path) == part


def test_missing_events_or_table(tmp_path):
    root = write(tmp_path / "ds")
    (root / "users.parquet").unlink()
    with pytest.raises(DataError, match="users.parquet: missing file"):
        load_dataset(root)
    root = write(tmp_path / "ds2")
    (root / "events" / "part-00000.parquet").unlink()
    with pytest.raises(DataError, match="no event parts"):
        load_dataset(root)


def test_atomic_dir_keeps_the_old_folder_on_failure_and_replaces_it_on_success(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(DataError, match="output exists"):
        with atomic_dir(out):
            pass
    with pytest.raises(RuntimeError):
        with atomic_dir(out, force=True) as tmp:
            (tmp / "new.txt").write_text("half")
            raise RuntimeError("interrupted")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["old.txt"]
    with atomic_dir(out, force=True) as tmp:
        write_events(tmp, _events())
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and [p.name for p in out.iterdir()] == ["events"]
