"""The small synthetic dataset (with its real frozen-encoder feature cache) shared by the trainer tests.

The dataset is generated per session (deterministic by seed, about a second). Encoding item text and
images with MiniLM and EfficientNet is the slow part, so the feature folder is kept in pytest's cache
between sessions and handed back to `build_features`, which recomputes only rows whose content hash
changed: the first session pays for the encoders once, later ones reuse the rows.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from trainer.data.mmrec import MMRecConfig, build_mmrec
from trainer.data.synth import SynthConfig, generate
from trainer.features.cache import FeatureConfig, build_features
from trainer.features.store import FEATURES

# Big enough that content features beat IDs on cold-start items after a few epochs, small enough that a
# training epoch takes a few seconds on one CPU thread.
SYNTH = SynthConfig(users=300, items=240, events=24_000, seed=0)


def synth_with_features(tmp_path_factory: pytest.TempPathFactory, cache: pytest.Cache) -> Path:
    root = tmp_path_factory.mktemp("trainer_data") / "synth"
    generate(root, SYNTH)
    kept = cache.mkdir("mmrank_trainer_features") / FEATURES
    if kept.is_dir():
        shutil.copytree(kept, root / FEATURES)
    build_features(root, FeatureConfig(runtime="torch", progress=False))
    shutil.rmtree(kept, ignore_errors=True)
    shutil.copytree(root / FEATURES, kept)
    return root


def mmrec_toy(
    tmp_path_factory: pytest.TempPathFactory, rows: list[tuple], rng: np.random.Generator, neg_ratio: int
) -> Path:
    """`build_mmrec` over a toy.inter of (user, item, timestamp, x_label) rows with one random 8-d text
    feature per item (60 items), drawn from `rng`."""
    src = tmp_path_factory.mktemp("mmrec_src")
    with open(src / "toy.inter", "w") as f:
        f.write("userID\titemID\ttimestamp\tx_label\n")
        f.writelines(f"{u}\t{i}\t{t}\t{x}\n" for u, i, t, x in rows)
    np.save(src / "text_feat.npy", rng.normal(size=(60, 8)).astype(np.float32))
    out = tmp_path_factory.mktemp("mmrec") / "ds"
    build_mmrec(src, out, MMRecConfig(name="toy", neg_ratio=neg_ratio))
    return out
