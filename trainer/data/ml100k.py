"""MovieLens-100K + TMDB overviews + TMDB posters -> the canonical dataset form (docs/design.md, "Sources").

Every rule below is also written into the manifest (label_rule and notes), so a dataset folder explains
itself:

- labels: rating >= 4 -> 1 (click), rating <= 2 -> 0 (non-click); rating 3 is dropped by default, or a 0
  with `neutral="negative"`.
- items: the 1,682 movies. Text `title` = "<title>. Genres: <genres>", `overview` = the TMDB plot text
  (first row per movie_id of items_tmdb.csv; "" where missing). `image` = the poster JPEG bytes (null where
  there is no poster). Categoricals `genre` (first genre flag + 1) and `decade` (release decade, in order).
  `created_at` = the release date (00:00 UTC) as unix seconds; a movie without one gets its first rating's
  time (the earliest rating overall if it has none).
- users: the 943 users with `age_bucket` (MovieLens-1M age groups), `gender` and `occupation`.
- ids: dense 1..n in the order of the MovieLens ids (`raw_id` keeps the original), 0 = unknown/padding.
- splits: by global time. valid starts at the (1 - valid_frac - test_frac) quantile of the kept events'
  timestamps and test at the (1 - test_frac) quantile; an event goes to the split its ts falls in.
- requests: the events of one user on one UTC day (ts // 86400) inside one split form a request.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from common.atomic import atomic_dir
from common.errors import DataError, MMRankError
from trainer.data.schema import SPLITS, Dataset, Manifest, write_dataset_files
from trainer.data.sourcefile import (
    check_known,
    check_range,
    check_unique,
    parse_ints,
    read_csv,
    read_lines,
    split_columns,
)
from trainer.data.validate import check_image_bytes, validate_dataset

ITEM_INFO = ["movie_id", "title", "release_date", "video_release_date", "imdb_url"]
USER_COLUMNS = ["user_id", "age", "gender", "occupation", "zip_code"]
RATING_COLUMNS = ["user_id", "item_id", "rating", "timestamp"]
# MovieLens-1M age groups: under 18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+ -> 1..7; 0 = unknown (age < 1).
AGE_EDGES = np.array([1, 18, 25, 35, 45, 50, 56])
GENDERS = {"M": 1, "F": 2}
SECONDS_PER_DAY = 86_400
JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass
class ML100KConfig:
    neutral: str = "drop"  # what rating 3 becomes: "drop" (no event) or "negative" (label 0)
    valid_frac: float = 0.1  # share of kept events, by time, in valid
    test_frac: float = 0.1  # share of kept events, by time, in test

    def __post_init__(self):
        if self.neutral not in ("drop", "negative"):
            raise MMRankError(f"neutral must be 'drop' or 'negative', got {self.neutral!r}")
        if not (self.valid_frac > 0 and self.test_frac > 0 and self.valid_frac + self.test_frac < 1):
            raise MMRankError(
                f"need valid_frac > 0, test_frac > 0 and valid_frac + test_frac < 1, "
                f"got {self.valid_frac} and {self.test_frac}"
            )

    @property
    def label_rule(self) -> str:
        neutral = "rating 3 dropped" if self.neutral == "drop" else "rating 3 -> 0"
        return f"rating >= 4 -> 1, rating <= 2 -> 0, {neutral}"


@dataclass
class ML100KSource:
    """The parsed and checked source files, still keyed by MovieLens ids; tables are indexed by file line."""

    items: (
        pd.DataFrame
    )  # movie_id, title, release (datetime, NaT if missing), overview, image (bytes or None)
    genre_flags: np.ndarray  # [items, genres] 0/1
    genres: list[str]
    users: pd.DataFrame  # user_id, age, gender, occupation
    occupations: list[str]
    ratings: pd.DataFrame  # user_id, item_id, rating, ts


def read_genres(path: Path) -> list[str]:
    """u.genre: "name|index" lines, indexes 0..n-1 in order (the order of u.item's genre flags)."""
    table = split_columns(read_lines(path, "latin-1"), path, "|", ["name", "index"])
    if table.empty:
        raise DataError(path, "no genres")
    index = parse_ints(table["index"], path, "index")
    wrong = index != np.arange(len(index))
    if wrong.any():
        i = int(np.flatnonzero(wrong)[0])
        raise DataError(
            path,
            f"index {index[i]}, expected {i} (genres listed in order)",
            column="index",
            row=int(table.index[i]),
        )
    return table["name"].str.strip().tolist()


def read_occupations(path: Path) -> list[str]:
    """u.occupation: one occupation name per line."""
    return read_lines(path, "latin-1").str.strip().tolist()


def read_items(path: Path, genres: list[str]) -> tuple[pd.DataFrame, np.ndarray]:
    table = split_columns(read_lines(path, "latin-1"), path, "|", ITEM_INFO + genres)
    movie_id = parse_ints(table["movie_id"], path, "movie_id")
    check_range(movie_id, table.index, path, "movie_id", 1, np.iinfo(np.int64).max)
    check_unique(pd.DataFrame({"movie_id": movie_id}, index=table.index), path, "movie_id")
    flags = np.stack([parse_ints(table[g], path, g) for g in genres], axis=1)
    for j, g in enumerate(genres):
        check_range(flags[:, j], table.index, path, g, 0, 1)
    raw_date = table["release_date"].astype(object).str.strip()
    release = pd.to_datetime(raw_date, format="%d-%b-%Y", errors="coerce")
    bad = release.isna() & (raw_date != "")
    if bad.any():
        line = int(bad.idxmax())
        raise DataError(
            path, f"release date {raw_date[line]!r} is not DD-Mon-YYYY", column="release_date", row=line
        )
    items = pd.DataFrame(
        {"movie_id": movie_id, "title": table["title"].str.strip(), "release": release}, index=table.index
    )
    return items, flags


def read_users(path: Path) -> pd.DataFrame:
    table = split_columns(read_lines(path, "latin-1"), path, "|", USER_COLUMNS)
    user_id = parse_ints(table["user_id"], path, "user_id")
    check_range(user_id, table.index, path, "user_id", 1, np.iinfo(np.int64).max)
    check_unique(pd.DataFrame({"user_id": user_id}, index=table.index), path, "user_id")
    return pd.DataFrame(
        {
            "user_id": user_id,
            "age": parse_ints(table["age"], path, "age"),
            "gender": table["gender"].str.strip(),
            "occupation": table["occupation"].str.strip(),
        },
        index=table.index,
    )


def read_ratings(path: Path, movie_ids: np.ndarray, user_ids: np.ndarray) -> pd.DataFrame:
    table = split_columns(read_lines(path), path, "\t", RATING_COLUMNS)
    cols = {name: parse_ints(table[name], path, name) for name in RATING_COLUMNS}
    check_known(cols["user_id"], user_ids, table.index, path, "user_id", "user id", "u.user")
    check_known(cols["item_id"], movie_ids, table.index, path, "item_id", "movie id", "u.item")
    check_range(cols["rating"], table.index, path, "rating", 1, 5)
    check_range(cols["timestamp"], table.index, path, "timestamp", 0, np.iinfo(np.int64).max)
    ratings = pd.DataFrame(
        {
            "user_id": cols["user_id"],
            "item_id": cols["item_id"],
            "rating": cols["rating"],
            "ts": cols["timestamp"],
        },
        index=table.index,
    )
    check_unique(ratings[["user_id", "item_id"]], path, "user_id, item_id")
    return ratings


def read_overviews(path: Path, movie_ids: np.ndarray) -> pd.Series:
    """movie_id -> TMDB overview; the first row wins where a movie matched more than one TMDB entry."""
    table = read_csv(path, ["movie_id", "overview"])
    ids = parse_ints(table["movie_id"], path, "movie_id")
    check_known(ids, movie_ids, table.index, path, "movie_id", "movie id", "u.item")
    overview = pd.Series(table["overview"].astype(object).str.strip().to_numpy(), index=ids)
    return overview[~overview.index.duplicated(keep="first")]


def read_posters(folder: Path, items: pd.DataFrame, item_file: Path) -> list[bytes | None]:
    """posters/<movie_id>.jpg bytes, fully decoded once to prove they are readable; None where absent."""
    if not folder.is_dir():
        raise DataError(folder, "missing folder")
    posters: list[bytes | None] = []
    for line, movie_id in zip(items.index, items["movie_id"], strict=True):
        path = folder / f"{movie_id}.jpg"
        if not path.is_file():
            posters.append(None)
            continue
        blob = path.read_bytes()
        if not blob.startswith(JPEG_MAGIC):
            raise DataError(
                path,
                f"not a JPEG (movie_id {movie_id}, {item_file.name} line {line})",
                column="image",
                row=int(line),
            )
        check_image_bytes(blob, path, row=int(line))
        posters.append(blob)
    return posters


def read_source(src: str | Path) -> ML100KSource:
    """Parse and check every source file; the first problem raises a DataError naming file, column, row."""
    src = Path(src)
    if not src.is_dir():
        raise DataError(src, "not a folder (expected ml-100k/, tmdb/ and posters/ inside)")
    ml = src / "ml-100k"
    genres = read_genres(ml / "u.genre")
    occupations = read_occupations(ml / "u.occupation")
    items, flags = read_items(ml / "u.item", genres)
    users = read_users(ml / "u.user")
    ratings = read_ratings(ml / "u.data", items["movie_id"].to_numpy(), users["user_id"].to_numpy())
    overviews = read_overviews(src / "tmdb" / "items_tmdb.csv", items["movie_id"].to_numpy())
    items["overview"] = overviews.reindex(items["movie_id"]).fillna("").to_numpy(dtype=object)
    items["image"] = read_posters(src / "posters", items, ml / "u.item")
    return ML100KSource(items, flags, genres, users, occupations, ratings)


def dense_ids(raw: np.ndarray, universe: np.ndarray) -> np.ndarray:
    """Raw ids -> 1..n in the sorted order of `universe` (every raw id is known to be in it)."""
    return np.searchsorted(np.sort(universe), raw) + 1


def build_items(source: ML100KSource) -> tuple[pd.DataFrame, dict[str, int], dict[str, object]]:
    items = source.items.sort_values("movie_id")
    flags = source.genre_flags[np.argsort(source.items["movie_id"].to_numpy(), kind="stable")]
    names = pd.Series(source.genres, dtype=object)
    genre_text = pd.Series([", ".join(names[row.astype(bool)]) for row in flags], dtype=object)
    title = np.where(
        genre_text != "",
        items["title"].to_numpy() + ". Genres: " + genre_text.to_numpy(),
        items["title"].to_numpy(),
    )
    genre = np.where(flags.any(axis=1), flags.argmax(axis=1) + 1, 0)
    year = items["release"].dt.year
    decades = np.sort(((year.dropna() // 10) * 10).astype(np.int64).unique())
    decade = np.where(year.isna(), 0, np.searchsorted(decades, ((year.fillna(0) // 10) * 10).to_numpy()) + 1)
    first_rating = source.ratings.groupby("item_id")["ts"].min()
    released = ((items["release"] - pd.Timestamp(0)) // pd.Timedelta(seconds=1)).to_numpy()
    fallback = first_rating.reindex(items["movie_id"]).fillna(source.ratings["ts"].min()).to_numpy()
    no_release = np.isnan(released)
    table = pd.DataFrame(
        {
            "item_id": dense_ids(items["movie_id"].to_numpy(), items["movie_id"].to_numpy()),
            "raw_id": items["movie_id"].to_numpy(),
            "created_at": np.where(no_release, fallback, released).astype(np.int64),
            "title": pd.Series(title, dtype=object),
            "overview": pd.Series(items["overview"].to_numpy(), dtype=object),
            "image": pd.Series(items["image"].to_numpy(), dtype=object),
            "genre": genre.astype(np.int64),
            "decade": decade.astype(np.int64),
        }
    )
    cardinalities = {"genre": len(source.genres) + 1, "decade": len(decades) + 1}
    missing = table.loc[table["image"].isna(), "raw_id"].tolist()
    notes = {
        "missing_posters": {"count": len(missing), "movie_ids": missing},
        "created_at_from_first_rating": table.loc[no_release, "raw_id"].tolist(),
        "released_after_first_rating": int((released > fallback).sum()),
        "genre_ids": {name: i + 1 for i, name in enumerate(source.genres)},
        "decade_ids": {str(int(d)): i + 1 for i, d in enumerate(decades)},
    }
    return table, cardinalities, notes


def build_users(source: ML100KSource) -> tuple[pd.DataFrame, dict[str, int], dict[str, object]]:
    users = source.users.sort_values("user_id")
    occupation_ids = {name: i + 1 for i, name in enumerate(source.occupations)}
    table = pd.DataFrame(
        {
            "user_id": dense_ids(users["user_id"].to_numpy(), users["user_id"].to_numpy()),
            "raw_id": users["user_id"].to_numpy(),
            "age_bucket": np.searchsorted(AGE_EDGES, users["age"].to_numpy(), side="right").astype(np.int64),
            "gender": users["gender"].map(GENDERS).fillna(0).astype(np.int64).to_numpy(),
            "occupation": users["occupation"].map(occupation_ids).fillna(0).astype(np.int64).to_numpy(),
        }
    )
    cardinalities = {
        "age_bucket": len(AGE_EDGES) + 1,
        "gender": len(GENDERS) + 1,
        "occupation": len(occupation_ids) + 1,
    }
    notes = {
        "age_bucket_lower_edges": {str(i + 1): int(edge) for i, edge in enumerate(AGE_EDGES)},
        "gender_ids": GENDERS,
        "occupation_ids": occupation_ids,
        "users_with_unknown_occupation": int((table["occupation"] == 0).sum()),
    }
    return table, cardinalities, notes


def time_split(
    ts: np.ndarray, valid_frac: float, test_frac: float, path: Path
) -> tuple[np.ndarray, int, int]:
    """Split codes by global time quantiles, and the first ts of valid and of test."""
    if len(ts) == 0:
        raise DataError(path, "no events left after applying the label rule", column="rating")
    ordered = np.sort(ts)
    last = len(ordered) - 1
    valid_start = int(ordered[min(int(len(ordered) * (1 - valid_frac - test_frac)), last)])
    test_start = int(ordered[min(int(len(ordered) * (1 - test_frac)), last)])
    split = np.where(
        ts >= test_start, SPLITS["test"], np.where(ts >= valid_start, SPLITS["valid"], SPLITS["train"])
    )
    counts = np.bincount(split, minlength=3)
    for name, code in SPLITS.items():
        if counts[code] == 0:
            raise DataError(
                path,
                f"split {name!r} would be empty ({len(ts)} events, valid_frac {valid_frac}, "
                f"test_frac {test_frac}, many equal timestamps at the boundary?)",
                column="timestamp",
            )
    return split.astype(np.int8), valid_start, test_start


def build_events(
    source: ML100KSource, config: ML100KConfig, path: Path
) -> tuple[pd.DataFrame, dict[str, int]]:
    ratings = source.ratings
    if config.neutral == "drop":
        ratings = ratings[ratings["rating"] != 3]
    ts = ratings["ts"].to_numpy()
    split, valid_start, test_start = time_split(ts, config.valid_frac, config.test_frac, path)
    events = pd.DataFrame(
        {
            "user_id": dense_ids(ratings["user_id"].to_numpy(), source.users["user_id"].to_numpy()),
            "item_id": dense_ids(ratings["item_id"].to_numpy(), source.items["movie_id"].to_numpy()),
            "label": (ratings["rating"].to_numpy() >= 4).astype(np.int8),
            "ts": ts,
            "split": split,
            "day": ts // SECONDS_PER_DAY,
        }
    )
    events["request_id"] = (
        events.groupby(["day", "user_id", "split"], sort=True).ngroup().astype(np.int64) + 1
    )
    events = events.drop(columns="day").sort_values(["ts", "user_id", "item_id"], kind="stable")
    return events.reset_index(drop=True), {"valid_start_ts": valid_start, "test_start_ts": test_start}


def event_counts(events: pd.DataFrame) -> dict[str, int]:
    """Events and positives per split, and events on items never seen in train (cold start)."""
    counts = {
        "events": len(events),
        "positives": int(events["label"].sum()),
        "requests": int(events["request_id"].nunique()),
    }
    seen = np.unique(events.loc[events["split"] == SPLITS["train"], "item_id"])
    for name, code in SPLITS.items():
        part = events[events["split"] == code]
        counts[name] = len(part)
        counts[f"{name}_positives"] = int(part["label"].sum())
        if code != SPLITS["train"]:
            cold = ~np.isin(part["item_id"].to_numpy(), seen)
            counts[f"cold_{name}_events"] = int(cold.sum())
            counts[f"cold_{name}_positives"] = int(part["label"].to_numpy()[cold].sum())
            counts[f"cold_{name}_items"] = len(np.unique(part["item_id"].to_numpy()[cold]))
    return counts


def items_schema(text_fields: list[str], categoricals: list[str]) -> pa.Schema:
    return pa.schema(
        [("item_id", pa.int64()), ("raw_id", pa.int64()), ("created_at", pa.int64())]
        + [(f, pa.string()) for f in text_fields]
        + [("image", pa.binary())]
        + [(c, pa.int64()) for c in categoricals]
    )


def build_ml100k(src: str | Path, out: str | Path, config: ML100KConfig, force: bool = False) -> Manifest:
    """Read, check and convert the source folder, then write the dataset folder atomically."""
    src, out = Path(src), Path(out)
    source = read_source(src)
    items, item_cards, item_notes = build_items(source)
    users, user_cards, user_notes = build_users(source)
    events, splits = build_events(source, config, src / "ml-100k" / "u.data")
    counts = {
        "items": len(items),
        "users": len(users),
        "ratings": len(source.ratings),
        **event_counts(events),
    }
    text_fields = ["title", "overview"]
    manifest = Manifest(
        name="ml100k",
        source="ml100k",
        seed=None,
        label_rule=config.label_rule,
        counts=counts,
        splits=splits,
        text_fields=text_fields,
        item_categoricals=item_cards,
        user_features=user_cards,
        has_images=True,
        notes={
            "src": str(src),
            "neutral": config.neutral,
            "valid_frac": config.valid_frac,
            "test_frac": config.test_frac,
            "split_rule": "by global time: valid from the (1 - valid_frac - test_frac) quantile of the kept "
            "events' ts, test from the (1 - test_frac) quantile",
            "request_rule": "the events of one user on one UTC day (ts // 86400) inside one split",
            "created_at_rule": "release date 00:00 UTC as unix seconds; without one, the movie's first rating ts",
            "cold_start_rule": "a valid/test event whose item has no train event",
            "text_rule": "title = '<u.item title>. Genres: <genre names>'; overview = first items_tmdb.csv row per "
            "movie_id, '' where missing",
            "image_rule": "poster JPEG bytes from posters/<movie_id>.jpg, null where missing",
            **item_notes,
            **user_notes,
        },
    )
    validate_dataset(Dataset(out, manifest, items, users, events))
    with atomic_dir(out, force, inputs=[src]) as tmp:
        schema = items_schema(text_fields, list(item_cards))
        items_table = pa.Table.from_pandas(items, schema=schema, preserve_index=False)
        write_dataset_files(tmp, manifest, items_table, users, events)
    return manifest


def cli(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    config = ML100KConfig(neutral=args.neutral, valid_frac=args.valid_frac, test_frac=args.test_frac)
    m = build_ml100k(args.src, args.out, config, force=args.force)
    c = m.counts
    print(
        f"wrote {args.out}: {c['items']} items ({m.notes['missing_posters']['count']} without poster), "
        f"{c['users']} users, {c['events']} events from {c['ratings']} ratings ({m.label_rule}); "
        f"train {c['train']} / valid {c['valid']} / test {c['test']}, positive rate "
        f"{c['positives'] / c['events']:.3f}, test cold-start {c['cold_test_events']} "
        f"[{time.perf_counter() - start:.1f} s]"
    )
    return 0
