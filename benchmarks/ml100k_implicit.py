"""ML-100K in MMRec's implicit form, for the EM3 Table 10 setting (`benchmarks/results/ml100k_implicit.md`).

Every rating of `u.data` (1-5) is a positive; each user's ratings, in time order (ties by file line),
are split 80/10/10 into x_label 0/1/2 (train/valid/test), MMRec's per-user chronological split. Raw
ids are the canonical ML-100K dataset's ids minus 1, so the features of `mmrank features` line up:
`text_feat.npy` is the mean of an item's present text tokens (title, overview), `image_feat.npy` its
poster feature (zeros where it has no poster).

    python -m benchmarks.ml100k_implicit --src ../shared/data/ml100k_tmdb_posters --data build/ml100k --out DIR
    mmrank data mmrec --src DIR --name ml100k --out build/ml100k_implicit
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

SPLIT = (0.8, 0.1)  # train, valid shares per user; the rest is test


def per_user_split(order_in_user: np.ndarray, user_size: np.ndarray) -> np.ndarray:
    """x_label of each row from its 0-based rank within its user and that user's row count."""
    n_train = np.floor(user_size * SPLIT[0]).astype(int)
    n_valid = np.floor(user_size * SPLIT[1]).astype(int)
    return np.where(order_in_user < n_train, 0, np.where(order_in_user < n_train + n_valid, 1, 2))


def convert(src: Path, data: Path, out: Path) -> None:
    ratings = pd.read_csv(src / "ml-100k" / "u.data", sep="\t", names=["user", "item", "rating", "ts"])
    users = pd.read_parquet(data / "users.parquet").set_index("raw_id")["user_id"]
    items = pd.read_parquet(data / "items.parquet").set_index("raw_id")["item_id"]
    frame = pd.DataFrame(
        {
            "userID": users.reindex(ratings["user"]).to_numpy() - 1,
            "itemID": items.reindex(ratings["item"]).to_numpy() - 1,
            "rating": ratings["rating"],
            "timestamp": ratings["ts"],
        }
    ).sort_values(["userID", "timestamp"], kind="stable")
    rank = frame.groupby("userID").cumcount().to_numpy()
    size = frame.groupby("userID")["userID"].transform("size").to_numpy()
    frame["x_label"] = per_user_split(rank, size)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / "ml100k.inter", sep="\t", index=False)
    feats = data / "features"
    text, text_mask = np.load(feats / "text.npy"), np.load(feats / "text_mask.npy")
    weights = text_mask[..., None].astype(np.float32)
    text_mean = (text * weights).sum(1) / np.maximum(weights.sum(1), 1.0)
    image = np.load(feats / "image.npy")[:, 0] * np.load(feats / "image_mask.npy")[:, :1]
    np.save(out / "text_feat.npy", text_mean[1:].astype(np.float32))  # row r = raw item r = item id r + 1
    np.save(out / "image_feat.npy", image[1:].astype(np.float32))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", type=Path, required=True, help="the ml100k_tmdb_posters folder")
    parser.add_argument(
        "--data", type=Path, required=True, help="the canonical ML-100K dataset, with features"
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for ml100k.inter and *_feat.npy")
    args = parser.parse_args()
    convert(args.src, args.data, args.out)
    print(f"ml100k_implicit: wrote {args.out}")


if __name__ == "__main__":
    main()
