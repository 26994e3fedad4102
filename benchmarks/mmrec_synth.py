"""Synthetic data in MMRec's format (`NAME.inter` + `text_feat.npy` + `image_feat.npy`) at any size, for
timing the two-tower presets at the scale of MMRec's Amazon sets (Baby: 19,445 users, 7,050 items,
160,792 interactions, 384-d text and 4096-d image features).

Users and items have latent tastes (`--factors` dims); each user draws `--per-user` distinct items with
probability softmax(<user, item> + popularity), so interactions carry collaborative signal and a
Zipf-like popularity skew; an item's text and image features are fixed random projections of its latent
vector plus noise, so content predicts taste. Each user's interactions are split 80/10/10 into x_label
0/1/2 in draw order (every user keeps at least one train row), MMRec's per-user split. An item nobody
drew gets one train interaction with a random user, so every item id has a row, as in MMRec's
(5-core filtered) sets.

    python -m benchmarks.mmrec_synth --users 20000 --items 7000 --out build/mmrec_20k_src
    mmrank data mmrec --src build/mmrec_20k_src --name synth --out build/mmrec_20k
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd


@dataclass
class MMRecSynthConfig:
    users: int = 20_000
    items: int = 7_000
    per_user: int = 8  # interactions per user (Baby: 8.3)
    factors: int = 16
    text_dim: int = 384
    image_dim: int = 4096
    noise: float = 1.0  # feature noise relative to the latent signal
    seed: int = 0


def interactions(cfg: MMRecSynthConfig, rng: np.random.Generator) -> tuple[pd.DataFrame, np.ndarray]:
    """(userID, itemID, x_label) rows and the items' latent vectors [items, factors]."""
    users = rng.normal(size=(cfg.users, cfg.factors)) / np.sqrt(cfg.factors) * 2
    items = rng.normal(size=(cfg.items, cfg.factors))
    popularity = -1.1 * np.log(np.arange(1, cfg.items + 1))  # Zipf-like, over a random item order
    popularity = popularity[rng.permutation(cfg.items)]
    rows = []
    for start in range(0, cfg.users, 1024):
        logits = users[start : start + 1024] @ items.T + popularity
        gumbel = rng.gumbel(size=logits.shape)  # top-k of logits + Gumbel = draws without replacement
        picked = np.argsort(-(logits + gumbel), axis=1)[:, : cfg.per_user]
        rows.append(picked)
    picked = np.concatenate(rows)
    n = cfg.per_user
    n_train = max(1, int(n * 0.8))
    n_valid = max(1, int(n * 0.1)) if n - n_train >= 2 else 0
    label = np.where(np.arange(n) < n_train, 0, np.where(np.arange(n) < n_train + n_valid, 1, 2))
    unseen = np.flatnonzero(np.bincount(picked.reshape(-1), minlength=cfg.items) == 0)
    frame = pd.DataFrame(
        {
            "userID": np.concatenate(
                [np.repeat(np.arange(cfg.users), n), rng.integers(0, cfg.users, len(unseen))]
            ),
            "itemID": np.concatenate([picked.reshape(-1), unseen]),
            "x_label": np.concatenate([np.tile(label, cfg.users), np.zeros(len(unseen), np.int64)]),
        }
    )
    return frame, items


def features(latent: np.ndarray, dim: int, noise: float, rng: np.random.Generator) -> np.ndarray:
    projection = rng.normal(size=(latent.shape[1], dim)) / np.sqrt(latent.shape[1])
    return (latent @ projection + noise * rng.normal(size=(len(latent), dim))).astype(np.float32)


def generate(out: Path, cfg: MMRecSynthConfig, name: str = "synth") -> pd.DataFrame:
    rng = np.random.default_rng(cfg.seed)
    frame, latent = interactions(cfg, rng)
    out.mkdir(parents=True, exist_ok=True)
    frame.to_csv(out / f"{name}.inter", sep="\t", index=False)
    np.save(out / "text_feat.npy", features(latent, cfg.text_dim, cfg.noise, rng))
    np.save(out / "image_feat.npy", features(latent, cfg.image_dim, cfg.noise, rng))
    return frame


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    defaults = MMRecSynthConfig()
    for field in ("users", "items", "per_user", "factors", "text_dim", "image_dim", "seed"):
        parser.add_argument(f"--{field.replace('_', '-')}", type=int, default=getattr(defaults, field))
    parser.add_argument("--noise", type=float, default=defaults.noise)
    parser.add_argument("--name", default="synth", help="the NAME of NAME.inter")
    parser.add_argument("--out", type=Path, required=True, help="folder for NAME.inter and *_feat.npy")
    args = parser.parse_args()
    cfg = MMRecSynthConfig(**{k: getattr(args, k) for k in defaults.__dataclass_fields__})
    start = time.perf_counter()
    frame = generate(args.out, cfg, args.name)
    counts = np.bincount(frame["x_label"], minlength=3)
    print(
        f"mmrec_synth: wrote {args.out}: {cfg.users} users, {cfg.items} items, {len(frame)} interactions "
        f"(train/valid/test {counts[0]}/{counts[1]}/{counts[2]}), text {cfg.text_dim}-d, image "
        f"{cfg.image_dim}-d [{time.perf_counter() - start:.1f} s]"
    )


if __name__ == "__main__":
    main()
