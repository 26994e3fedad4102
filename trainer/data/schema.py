"""The canonical dataset form shared by every source, loader and the trainer.

A dataset is a folder:

    manifest.json        schema version, source, seed, label rule, counts, split boundaries, field lists
    items.parquet        item_id, created_at, one string column per text field, image (bytes or null),
                         one int64 column per item categorical (0 = unknown)
    users.parquet        user_id, one int64 column per user feature (0 = unknown)
    events/part-*.parquet  user_id, item_id, label, ts, request_id, split (0 train, 1 valid, 2 test)
    item_features/*.npy  optional precomputed item features, row i = item_id i (row 0 = padding)

Columns prefixed `latent_` (synthetic data only) are the generator's ground truth, kept for tests of
the planted signal; loaders, features and the trainer never read them.

Ids are dense: items 1..num_items and users 1..num_users. Id 0 is reserved for padding in histories
and for "unknown" in lookups, so an embedding table of num_items + 1 rows covers every id.
"""

from __future__ import annotations

import bisect
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from common.errors import DataError

SCHEMA_VERSION = 1
PAD_ID = 0
MANIFEST = "manifest.json"
ITEMS = "items.parquet"
USERS = "users.parquet"
EVENTS = "events"
ITEM_FEATURES = "item_features"
SPLITS = {"train": 0, "valid": 1, "test": 2}

EVENT_SCHEMA = pa.schema(
    [
        ("user_id", pa.int64()),
        ("item_id", pa.int64()),
        ("label", pa.int8()),
        ("ts", pa.int64()),
        ("request_id", pa.int64()),
        ("split", pa.int8()),
    ]
)


@dataclass
class Manifest:
    """What a dataset folder holds; written last, so a folder with a manifest is complete."""

    name: str
    source: str
    seed: int | None
    label_rule: str
    counts: dict[str, int]
    splits: dict[str, int]  # valid_start_ts, test_start_ts: train < valid_start <= valid < test_start <= test
    text_fields: list[str]
    item_categoricals: dict[str, int]  # column -> cardinality (ids 0..cardinality-1, 0 = unknown)
    user_features: dict[str, int]
    has_images: bool
    item_features: dict[str, str] = field(default_factory=dict)  # name -> relative .npy path
    topk_protocol: bool = False  # MMRec data: evaluate Recall@K / NDCG@K over all items
    notes: dict[str, object] = field(default_factory=dict)
    schema_version: int = SCHEMA_VERSION

    def to_json(self) -> str:
        return json.dumps(self.__dict__, indent=2, sort_keys=True)

    @classmethod
    def read(cls, root: str | Path) -> Manifest:
        path = Path(root) / MANIFEST
        if not path.is_file():
            raise DataError(path, "no manifest: not a dataset folder (build one with `mmrank data ...`)")
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise DataError(path, f"manifest is not valid JSON ({e})") from e
        if raw.get("schema_version") != SCHEMA_VERSION:
            raise DataError(path, f"schema_version {raw.get('schema_version')!r}, expected {SCHEMA_VERSION}")
        try:
            manifest = cls(**raw)
        except TypeError as e:
            raise DataError(path, f"manifest fields do not match the schema ({e})") from e
        manifest._check_counts(path)
        return manifest

    def _check_counts(self, path: Path) -> None:
        """The counts every reader sizes its tables by, checked here so none of them meets a KeyError."""
        if not isinstance(self.counts, dict):
            raise DataError(path, f"counts is {self.counts!r}, expected an object")
        for key in ("items", "users"):
            value = self.counts.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise DataError(path, f"counts.{key} is {value!r}, expected a non-negative integer")


class EventsWriter:
    """Appends event chunks as numbered Parquet parts, so generators never hold all events in memory."""

    def __init__(self, root: Path):
        self.dir = Path(root) / EVENTS
        self.dir.mkdir(parents=True, exist_ok=True)
        self.parts = 0
        self.rows = 0

    def write(self, chunk: dict[str, np.ndarray] | pd.DataFrame) -> None:
        table = pa.Table.from_pydict(
            {name: np.asarray(chunk[name]) for name in EVENT_SCHEMA.names}, schema=EVENT_SCHEMA
        )
        if table.num_rows == 0:
            return
        pq.write_table(table, self.dir / f"part-{self.parts:05d}.parquet", compression="zstd")
        self.parts += 1
        self.rows += table.num_rows


def write_events(root: Path, events: pd.DataFrame) -> int:
    writer = EventsWriter(root)
    writer.write(events)
    return writer.rows


def write_dataset_files(
    root: Path, manifest: Manifest, items: pa.Table | pd.DataFrame, users: pa.Table | pd.DataFrame, events
) -> None:
    """Items, users, events and, last, the manifest of a dataset held in memory (inside `atomic_dir`)."""
    for table, name in ((items, ITEMS), (users, USERS)):
        if isinstance(table, pd.DataFrame):
            table = pa.Table.from_pandas(table, preserve_index=False)
        pq.write_table(table, root / name, compression="zstd")
    write_events(root, events)
    (root / MANIFEST).write_text(manifest.to_json())


@dataclass(frozen=True)
class RowSource:
    """The files a table was concatenated from, in order, so an error can name the file and the row in
    it instead of a row of the whole table."""

    folder: Path
    files: tuple[Path, ...]
    starts: tuple[int, ...]  # first row of each file in the table

    def locate(self, row: int | None) -> tuple[Path, int | None]:
        if row is None:
            return self.folder, None
        part = bisect.bisect_right(self.starts, row) - 1
        return self.files[part], row - self.starts[part]


@dataclass
class Dataset:
    """A loaded dataset: the manifest, the item and user tables, and events sorted by (ts, user)."""

    root: Path
    manifest: Manifest
    items: pd.DataFrame
    users: pd.DataFrame
    events: pd.DataFrame
    # The event parts the rows were read from (in file order, before sorting); None for events held in
    # memory, whose errors name the events folder and the row of the frame.
    event_source: RowSource | None = None

    @property
    def num_items(self) -> int:
        return self.manifest.counts["items"]

    @property
    def num_users(self) -> int:
        return self.manifest.counts["users"]

    def split(self, name: str) -> pd.DataFrame:
        return self.events[self.events["split"] == SPLITS[name]]

    def item_feature(self, name: str) -> np.ndarray:
        return np.load(self.root / self.manifest.item_features[name], mmap_mode="r")


def read_events(root: str | Path, columns: list[str] | None = None) -> pd.DataFrame:
    return read_event_parts(root, columns)[0]


def read_event_parts(root: str | Path, columns: list[str] | None = None) -> tuple[pd.DataFrame, RowSource]:
    """All event parts in name order, concatenated, and where each row came from."""
    folder = Path(root) / EVENTS
    # The files pyarrow's folder reader takes: it skips names starting with "." or "_".
    parts = sorted(p for p in folder.glob("*.parquet") if not p.name.startswith((".", "_")))
    if not parts:
        raise DataError(folder, "no event parts (events/part-*.parquet)")
    tables = []
    for part in parts:
        try:
            tables.append(pq.read_table(part, columns=columns))
        except (pa.ArrowInvalid, OSError) as e:
            raise DataError(part, f"unreadable Parquet ({e})") from e
    for part, table in zip(parts, tables, strict=True):
        if not table.schema.equals(tables[0].schema):
            raise DataError(
                part, f"columns {table.schema.names} or their types differ from {parts[0].name}'s"
            )
    starts = np.cumsum([0] + [t.num_rows for t in tables[:-1]]).tolist()
    return pa.concat_tables(tables).to_pandas(), RowSource(folder, tuple(parts), tuple(starts))


def _read_table(path: Path) -> pd.DataFrame:
    if not path.is_file():
        raise DataError(path, "missing file")
    try:
        return pq.read_table(path).to_pandas()
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(path, f"unreadable Parquet ({e})") from e


def load_dataset(root: str | Path, validate: bool = True) -> Dataset:
    """Read a dataset folder; with `validate`, check it first (see `trainer.data.validate`)."""
    root = Path(root)
    manifest = Manifest.read(root)
    items = _read_table(root / ITEMS)
    users = _read_table(root / USERS)
    events, event_source = read_event_parts(root)
    ds = Dataset(root, manifest, items, users, events, event_source)
    if validate:
        from trainer.data.validate import validate_dataset

        validate_dataset(ds)
    ds.events = ds.events.sort_values(["ts", "user_id"], kind="stable").reset_index(drop=True)
    return ds
