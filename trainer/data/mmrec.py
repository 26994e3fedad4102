"""MMRec-format folders -> the canonical dataset form (docs/design.md, "Sources"), evaluated by top-K ranking.

Input: `NAME.inter`, tab-separated, with a header naming at least `userID`, `itemID` and `x_label`
(0 train, 1 valid, 2 test); `rating` and `timestamp` are optional and must be numbers when present. Every
`*_feat.npy` in the folder is a precomputed item feature matrix whose row r belongs to raw item id r.

Rules (also written into the manifest):

- ids: raw ids are 0-based; id = raw + 1, so items are 1..max itemID + 1 and users 1..max userID + 1
  (`raw_id` keeps the original). Every raw item keeps its place because feature rows are positional.
- labels: implicit feedback, every .inter row is a positive. Each train positive also gets `neg_ratio`
  negatives (label 0), drawn uniformly, with replacement, from the items its user has no train row with,
  as MMRec and the trainer's own sampler do: a user's valid and test items may be drawn, since excluding
  them would make the training data depend on the held-out splits. valid and test hold the positives
  only: the top-K protocol ranks every item.
- ts is an order, not a time: train rows are numbered 0..n_train-1 (by timestamp when the file has one,
  then by file line); every valid row has ts n_train and every test row n_train + 1. So train < valid < test
  and a causal history for a valid row is exactly its user's train positives. A negative shares its
  positive's ts.
- splits: the file's x_label, not time. ts is derived from the split, so the canonical split-time check
  (train < valid_start <= valid < test_start <= test) holds by construction and says nothing about the
  source timestamps: a valid row may be older than a train row.
- requests: a train positive and its negatives form one request; valid and test rows form one request per
  (user, split).
- created_at: the ts of the item's first .inter row (0 for an item without one).
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from common.atomic import atomic_dir
from common.errors import DataError, MMRankError
from trainer.data.schema import ITEM_FEATURES, SPLITS, Dataset, Manifest, write_dataset_files
from trainer.data.sourcefile import (
    check_range,
    check_unique,
    parse_ints,
    parse_numbers,
    read_lines,
    split_columns,
)
from trainer.data.validate import validate_dataset

REQUIRED_COLUMNS = ["userID", "itemID", "x_label"]
NUMERIC_COLUMNS = ["rating", "timestamp"]
FEATURE_GLOB = "*_feat.npy"


@dataclass
class MMRecConfig:
    name: str  # the NAME of NAME.inter
    neg_ratio: int = 4  # sampled negatives per train positive
    seed: int = 0  # seed of the negative sampler

    def __post_init__(self):
        if not self.name or Path(self.name).name != self.name:
            raise MMRankError(f"--name must be a file stem such as 'baby', got {self.name!r}")
        if self.neg_ratio < 0:
            raise MMRankError(f"--neg-ratio must be >= 0, got {self.neg_ratio}")
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise MMRankError(f"--seed must be a non-negative integer, got {self.seed!r}")

    @property
    def label_rule(self) -> str:
        return (
            f"implicit: every .inter row -> 1; {self.neg_ratio} sampled negatives (label 0) per train positive "
            "from items the user has no train interaction with; valid/test positives only (top-K protocol)"
        )


def read_inter(path: Path) -> tuple[pd.DataFrame, bool]:
    """NAME.inter -> (user, item, x_label (raw ids) and `order` (timestamp, or 0 without one), indexed by
    line; whether the file has a timestamp column)."""
    lines = read_lines(path)
    if lines.empty:
        raise DataError(path, "empty file (expected a header: userID, itemID, x_label ...)")
    header_line = int(lines.index[0])
    header = [h.strip() for h in lines.iloc[0].split("\t")]
    for name in REQUIRED_COLUMNS:
        if name not in header:
            raise DataError(path, f"missing header column (header: {header})", column=name, row=header_line)
    if len(set(header)) != len(header):
        raise DataError(path, f"repeated header column (header: {header})", row=header_line)
    table = split_columns(lines.iloc[1:], path, "\t", header)
    inter = pd.DataFrame(
        {
            "user": parse_ints(table["userID"], path, "userID"),
            "item": parse_ints(table["itemID"], path, "itemID"),
            "x_label": parse_ints(table["x_label"], path, "x_label"),
        },
        index=table.index,
    )
    numbers = {name: parse_numbers(table[name], path, name) for name in NUMERIC_COLUMNS if name in header}
    inter["order"] = numbers.get("timestamp", np.zeros(len(inter)))
    for column, name in (("user", "userID"), ("item", "itemID")):
        check_range(inter[column].to_numpy(), inter.index, path, name, 0, np.iinfo(np.int32).max)
    check_range(inter["x_label"].to_numpy(), inter.index, path, "x_label", 0, 2)
    check_unique(inter[["user", "item"]], path, "userID, itemID")
    present = np.bincount(inter["x_label"].to_numpy(), minlength=3)
    for name, code in SPLITS.items():
        if present[code] == 0:
            raise DataError(path, f"no rows with x_label {code}: split {name!r} is empty", column="x_label")
    return inter, "timestamp" in numbers


def read_item_features(src: Path, num_items: int, inter_name: str) -> dict[str, np.ndarray]:
    """stem -> 2-D numeric matrix with one finite row per raw item id (memory-mapped, not copied)."""
    features = {}
    for path in sorted(src.glob(FEATURE_GLOB)):
        try:
            values = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise DataError(path, f"unreadable .npy ({e})") from e
        if values.dtype.kind not in "fiu" or values.ndim != 2:
            raise DataError(
                path, f"{values.dtype} array of shape {values.shape}, expected a 2-D numeric matrix"
            )
        if values.shape[0] != num_items:
            raise DataError(
                path,
                f"{values.shape[0]} rows, but {inter_name} has {num_items} raw items "
                "(max itemID + 1); row r must be raw item r",
            )
        finite = np.isfinite(values).all(axis=1)
        if not finite.all():
            row = int(np.flatnonzero(~finite)[0])
            raise DataError(path, f"non-finite value in the features of raw item {row}", row=row)
        features[path.name.removesuffix(".npy")] = values
    return features


def nth_uninteracted(
    seen_user: np.ndarray, seen_item: np.ndarray, num_items: int, user: np.ndarray, rank: np.ndarray
) -> np.ndarray:
    """For each query, the rank-th (0-based) item of 0..num_items-1 outside `user`'s seen items.

    seen_user, seen_item: unique interactions sorted by (user, item). Below a user's j-th seen item s_j lie
    s_j - j unseen items, a count that never decreases with j, so the answer is rank + (number of seen
    items with s_j - j <= rank); one searchsorted over all users' (user, s_j - j) keys finds that number.
    """
    first = np.searchsorted(seen_user, seen_user, side="left")
    stride = np.int64(num_items + 1)
    keys = seen_user * stride + (seen_item - (np.arange(len(seen_item)) - first))
    below = np.searchsorted(keys, user * stride + rank, side="right") - np.searchsorted(
        seen_user, user, side="left"
    )
    return rank + below


def nth_uninteracted_reference(
    seen_user: np.ndarray, seen_item: np.ndarray, num_items: int, user: np.ndarray, rank: np.ndarray
) -> np.ndarray:
    """Plain version of `nth_uninteracted`: list each user's unseen items and index them."""
    unseen = {u: np.setdiff1d(np.arange(num_items), seen_item[seen_user == u]) for u in np.unique(user)}
    return np.array([unseen[u][r] for u, r in zip(user, rank, strict=True)], dtype=np.int64)


def sample_negatives(
    num_items: int, positives: pd.DataFrame, ratio: int, rng: np.random.Generator, path: Path
) -> np.ndarray:
    """[len(positives), ratio] raw item ids, uniform over the items outside each user's `positives` (the
    train split: held-out positives stay eligible, so negatives leak nothing about valid and test)."""
    if ratio == 0:
        return np.empty((len(positives), 0), np.int64)
    seen = positives[["user", "item"]].sort_values(["user", "item"])
    seen_user, seen_item = seen["user"].to_numpy(), seen["item"].to_numpy()
    user = positives["user"].to_numpy()
    free = num_items - np.bincount(seen_user, minlength=user.max() + 1)[user]
    if (free == 0).any():
        row = int(np.flatnonzero(free == 0)[0])
        raise DataError(
            path,
            f"user {user[row]} has a train interaction with every item: no negative to sample",
            column="userID",
            row=int(positives.index[row]),
        )
    rank = rng.integers(0, free[:, None], size=(len(user), ratio))
    return nth_uninteracted(seen_user, seen_item, num_items, np.repeat(user, ratio), rank.ravel()).reshape(
        -1, ratio
    )


def build_events(
    inter: pd.DataFrame, num_items: int, config: MMRecConfig, path: Path
) -> tuple[pd.DataFrame, dict[str, int]]:
    rows = inter.assign(line=inter.index).sort_values(["x_label", "order", "line"], kind="stable")
    n_train = int((rows["x_label"] == SPLITS["train"]).sum())
    x_label = rows["x_label"].to_numpy()
    train = x_label == SPLITS["train"]
    ts = np.where(train, np.arange(len(rows)), n_train + x_label - 1)
    request = np.empty(len(rows), np.int64)
    request[train] = np.arange(1, n_train + 1)
    held_out = rows.loc[~train, ["x_label", "user"]]
    request[~train] = n_train + 1 + held_out.groupby(["x_label", "user"], sort=True).ngroup().to_numpy()
    positives = pd.DataFrame(
        {
            "user_id": rows["user"].to_numpy() + 1,
            "item_id": rows["item"].to_numpy() + 1,
            "label": 1,
            "ts": ts,
            "request_id": request,
            "split": x_label,
        }
    )
    negative_items = sample_negatives(
        num_items, rows[train], config.neg_ratio, np.random.default_rng(config.seed), path
    )
    negatives = pd.DataFrame(
        {
            "user_id": np.repeat(positives["user_id"].to_numpy()[train], config.neg_ratio),
            "item_id": negative_items.ravel() + 1,
            "label": 0,
            "ts": np.repeat(ts[train], config.neg_ratio),
            "request_id": np.repeat(request[train], config.neg_ratio),
            "split": SPLITS["train"],
        }
    )
    events = pd.concat([positives, negatives], ignore_index=True).astype(
        {"label": np.int8, "split": np.int8, "ts": np.int64, "user_id": np.int64, "item_id": np.int64}
    )
    events = events.sort_values(["ts", "request_id", "label"], ascending=[True, True, False], kind="stable")
    return events.reset_index(drop=True), {"valid_start_ts": n_train, "test_start_ts": n_train + 1}


def event_counts(events: pd.DataFrame, num_items: int, num_users: int) -> dict[str, int]:
    """Events per split; held-out rows whose item has no train positive are cold start."""
    positive = events["label"] == 1
    trained = np.unique(events.loc[positive & (events["split"] == SPLITS["train"]), "item_id"])
    counts = {
        "events": len(events),
        "positives": int(positive.sum()),
        "requests": int(events["request_id"].nunique()),
        "items_without_interactions": num_items - events.loc[positive, "item_id"].nunique(),
        "users_without_interactions": num_users - events["user_id"].nunique(),
    }
    for name, code in SPLITS.items():
        part = events[events["split"] == code]
        counts[name] = len(part)
        counts[f"{name}_positives"] = int(part["label"].sum())
        if code != SPLITS["train"]:
            counts[f"cold_{name}_events"] = int((~np.isin(part["item_id"].to_numpy(), trained)).sum())
    counts["train_negatives"] = counts["train"] - counts["train_positives"]
    return counts


def write_item_features(root: Path, features: dict[str, np.ndarray]) -> dict[str, str]:
    """Copy each matrix under item_features/ with a zero row 0 on top, so row i = canonical item id i."""
    written = {}
    if features:
        (root / ITEM_FEATURES).mkdir()
    for name, values in features.items():
        rel = f"{ITEM_FEATURES}/{name}.npy"
        out = np.lib.format.open_memmap(
            root / rel, mode="w+", dtype=values.dtype, shape=(values.shape[0] + 1, values.shape[1])
        )
        out[0] = 0
        out[1:] = values
        out.flush()
        del out
        written[name] = rel
    return written


def build_mmrec(src: str | Path, out: str | Path, config: MMRecConfig, force: bool = False) -> Manifest:
    """Read, check and convert SRC/NAME.inter (+ *_feat.npy), then write the dataset folder atomically."""
    src, out = Path(src), Path(out)
    if not src.is_dir():
        raise DataError(src, "not a folder")
    path = src / f"{config.name}.inter"
    inter, has_timestamp = read_inter(path)
    num_items, num_users = int(inter["item"].max()) + 1, int(inter["user"].max()) + 1
    features = read_item_features(src, num_items, path.name)
    events, splits = build_events(inter, num_items, config, path)
    first_seen = events[events["label"] == 1].groupby("item_id")["ts"].min()
    items = pd.DataFrame(
        {
            "item_id": np.arange(1, num_items + 1, dtype=np.int64),
            "raw_id": np.arange(num_items, dtype=np.int64),
        }
    )
    items["created_at"] = first_seen.reindex(items["item_id"]).fillna(0).astype(np.int64).to_numpy()
    users = pd.DataFrame(
        {
            "user_id": np.arange(1, num_users + 1, dtype=np.int64),
            "raw_id": np.arange(num_users, dtype=np.int64),
        }
    )
    manifest = Manifest(
        name=config.name,
        source="mmrec",
        seed=config.seed,
        label_rule=config.label_rule,
        counts={
            "items": num_items,
            "users": num_users,
            "interactions": len(inter),
            **event_counts(events, num_items, num_users),
        },
        splits=splits,
        text_fields=[],
        item_categoricals={},
        user_features={},
        has_images=False,
        topk_protocol=True,
        notes={
            "src": str(src),
            "neg_ratio": config.neg_ratio,
            "id_rule": "id = raw 0-based id + 1; raw_id keeps the original",
            "ts_rule": "an order, not a time: train rows 0..n_train-1 (by timestamp, then file line), every valid "
            "row n_train, every test row n_train + 1; negatives share their positive's ts",
            "ts_order": "timestamp column, then file line" if has_timestamp else "file line",
            "split_rule": "x_label of the .inter file, not time: ts is derived from the split, so splits "
            "follow ts by construction whatever the source timestamps say",
            "history_rule": "top-K protocol: a user's history is their train positives (for test too: "
            "valid positives are not added)",
            "request_rule": "train: a positive and its negatives; valid/test: one per (user, split)",
            "cold_start_rule": "a valid/test row whose item has no train positive",
            "created_at_rule": "ts of the item's first .inter row, 0 without one",
        },
    )
    with atomic_dir(out, force, inputs=[src]) as tmp:
        manifest.item_features = write_item_features(tmp, features)
        validate_dataset(Dataset(tmp, manifest, items, users, events))
        write_dataset_files(tmp, manifest, items, users, events)
    return manifest


def cli(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    config = MMRecConfig(name=args.name, neg_ratio=args.neg_ratio, seed=args.seed)
    m = build_mmrec(args.src, args.out, config, force=args.force)
    c = m.counts
    print(
        f"wrote {args.out}: {c['items']} items, {c['users']} users, {c['interactions']} interactions -> "
        f"{c['events']} events (train {c['train']} incl. {c['train_negatives']} sampled negatives, "
        f"valid {c['valid']}, test {c['test']}, test cold-start {c['cold_test_events']}); item features: "
        f"{', '.join(m.item_features) or 'none'} [{time.perf_counter() - start:.1f} s]"
    )
    return 0
