"""Checks a loaded dataset against the canonical schema; the first problem raises a DataError that names
the file, the column and the row, so a user can open the file and find it."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from common.errors import DataError
from model_repository.image_inputs import ImageSizeError, check_image_size
from trainer.data.schema import EVENT_SCHEMA, EVENTS, ITEMS, MANIFEST, SPLITS, USERS, Dataset, RowSource

# Where rows live: one file (row = row of the file) or several files read as one table.
Source = str | Path | RowSource


def _error(source: Source, message: str, column: str | None = None, row: int | None = None) -> DataError:
    if isinstance(source, RowSource):
        source, row = source.locate(row)
    return DataError(source, message, column=column, row=row)


def _require(df: pd.DataFrame, path: Source, columns: dict[str, str]) -> None:
    """columns: name -> numpy kind ('i' integer, 'O' object/string, 'b' bytes-or-null)."""
    for name, kind in columns.items():
        if name not in df.columns:
            raise _error(path, "missing column", column=name)
        dtype = df[name].dtype
        if kind == "i" and not pd.api.types.is_integer_dtype(dtype):
            raise _error(path, f"dtype {dtype}, expected an integer", column=name)
        if kind in ("O", "b") and pd.api.types.is_numeric_dtype(dtype):
            raise _error(path, f"dtype {dtype}, expected {'text' if kind == 'O' else 'bytes'}", column=name)
        if kind == "b":
            # An object column passes the dtype check with any values in it, image paths included.
            bad = df[name].map(lambda x: not (x is None or isinstance(x, bytes))).to_numpy(dtype=bool)
            if bad.any():
                row = _first(bad)
                found = type(df[name].iloc[row]).__name__
                raise _error(path, f"a {found}, expected encoded image bytes or null", column=name, row=row)


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def check_ids(
    values: np.ndarray, path: Source, column: str, low: int, high: int, unique: bool = False
) -> None:
    """Every id in [low, high]; with `unique`, no id twice."""
    values = np.asarray(values)
    bad = (values < low) | (values > high)
    if bad.any():
        row = _first(bad)
        raise _error(path, f"id {values[row]} out of range [{low}, {high}]", column=column, row=row)
    if unique:
        _, first_index, counts = np.unique(values, return_index=True, return_counts=True)
        if (counts > 1).any():
            dup = values[first_index[counts > 1][0]]
            row = _first(values == dup)
            rows = np.flatnonzero(values == dup)
            raise _error(path, f"duplicate id {dup} (rows {rows[:5].tolist()})", column=column, row=row)


def check_image_bytes(blob, path, row: int, column: str = "image") -> None:
    """The image is within the size bounds of the feature cache and the server (checked on the header,
    before decoding) and decodes completely: `verify()` alone reads only headers and passes a truncated
    JPEG."""
    if blob is None:
        return
    try:
        with Image.open(io.BytesIO(blob)) as im:
            check_image_size(*im.size)
            im.load()
    except ImageSizeError as e:
        raise DataError(path, f"{e} (the encoder refuses it)", column=column, row=row) from e
    # Decoders raise many types on hostile bytes; PIL's DecompressionBombError is a plain Exception.
    except Exception as e:
        raise DataError(path, f"unreadable image ({type(e).__name__}: {e})", column=column, row=row) from e


def validate_items(ds: Dataset) -> None:
    path = ds.root / ITEMS
    m = ds.manifest
    cols = {"item_id": "i", "created_at": "i", **{f: "O" for f in m.text_fields}}
    cols.update({c: "i" for c in m.item_categoricals})
    if m.has_images:
        cols["image"] = "b"
    _require(ds.items, path, cols)
    n = m.counts["items"]
    if len(ds.items) != n:
        raise DataError(path, f"{len(ds.items)} rows, manifest says {n} items")
    check_ids(ds.items["item_id"].to_numpy(), path, "item_id", 1, n, unique=True)
    for c, card in m.item_categoricals.items():
        check_ids(ds.items[c].to_numpy(), path, c, 0, card - 1)
    for f in m.text_fields:
        # pandas >= 3 reads a null string as NaN, not None.
        bad = ds.items[f].map(lambda x: not (isinstance(x, str) or pd.isna(x))).to_numpy()
        if bad.any():
            raise DataError(path, "not a string", column=f, row=_first(bad))
    if m.has_images:
        for row, blob in enumerate(ds.items["image"].to_numpy()):
            check_image_bytes(blob, path, row)


def validate_users(ds: Dataset) -> None:
    path = ds.root / USERS
    m = ds.manifest
    _require(ds.users, path, {"user_id": "i", **{c: "i" for c in m.user_features}})
    n = m.counts["users"]
    if len(ds.users) != n:
        raise DataError(path, f"{len(ds.users)} rows, manifest says {n} users")
    check_ids(ds.users["user_id"].to_numpy(), path, "user_id", 1, n, unique=True)
    for c, card in m.user_features.items():
        check_ids(ds.users[c].to_numpy(), path, c, 0, card - 1)


def validate_events(ds: Dataset) -> None:
    path = ds.event_source or ds.root / EVENTS
    ev = ds.events
    _require(ev, path, {name: "i" for name in EVENT_SCHEMA.names})
    check_ids(ev["user_id"].to_numpy(), path, "user_id", 1, ds.num_users)
    check_ids(ev["item_id"].to_numpy(), path, "item_id", 1, ds.num_items)
    check_ids(ev["label"].to_numpy(), path, "label", 0, 1)
    check_ids(ev["split"].to_numpy(), path, "split", 0, 2)
    counts = np.bincount(ev["split"].to_numpy(), minlength=3)
    for name, code in SPLITS.items():
        if counts[code] == 0:
            raise _error(path, f"split {name!r} is empty", column="split")
    check_split_times(ev["ts"].to_numpy(), ev["split"].to_numpy(), split_bounds(ds), path)


def split_bounds(ds: Dataset) -> tuple[int, int]:
    """The manifest's (valid_start_ts, test_start_ts), checked to be integers in that order."""
    path = ds.root / MANIFEST
    splits = ds.manifest.splits
    for key in ("valid_start_ts", "test_start_ts"):
        value = splits.get(key)
        if not isinstance(value, int | np.integer) or isinstance(value, bool):
            raise DataError(path, f"splits.{key} is {value!r}, expected an integer timestamp")
    valid_start, test_start = splits["valid_start_ts"], splits["test_start_ts"]
    if valid_start >= test_start:
        raise DataError(path, f"splits: valid_start_ts {valid_start} must be < test_start_ts {test_start}")
    return valid_start, test_start


def check_split_times(ts: np.ndarray, split: np.ndarray, bounds: tuple[int, int], path: Source) -> None:
    """train < valid_start <= valid < test_start <= test (docs/design.md, "Splits"). A label that
    disagrees with its event's time puts held-out positives into training histories, so the first such
    row is an error."""
    valid_start, test_start = bounds
    expected = np.where(
        ts < valid_start, SPLITS["train"], np.where(ts < test_start, SPLITS["valid"], SPLITS["test"])
    )
    wrong = split != expected
    if wrong.any():
        row = _first(wrong)
        names = {code: name for name, code in SPLITS.items()}
        raise _error(
            path,
            f"split {names[int(split[row])]!r} at ts {ts[row]}, but the manifest's boundaries "
            f"(valid_start_ts {valid_start}, test_start_ts {test_start}) put that time in "
            f"{names[int(expected[row])]!r}: splits must follow time",
            column="split",
            row=row,
        )


def validate_item_features(ds: Dataset) -> None:
    """Each precomputed feature file loads, has a row per item plus the padding row 0, and row 0 is zero."""
    for name, rel in ds.manifest.item_features.items():
        path = ds.root / rel
        if not path.is_file():
            raise DataError(path, f"missing item feature file {name!r}")
        try:
            values = ds.item_feature(name)
        except (ValueError, OSError) as e:
            raise DataError(path, f"unreadable .npy ({e})") from e
        if values.ndim == 0 or values.shape[0] != ds.num_items + 1:
            raise DataError(
                path, f"shape {values.shape}, expected {ds.num_items + 1} rows (items + padding row 0)"
            )
        if np.any(values[0]):
            raise DataError(path, "padding row is not zero", row=0)


def validate_dataset(ds: Dataset) -> None:
    validate_items(ds)
    validate_users(ds)
    validate_events(ds)
    validate_item_features(ds)
