"""The small synthetic dataset (with its real frozen-encoder feature cache) shared by the trainer tests.

The dataset is generated per session (deterministic by seed, about a second). Encoding item text and
images with MiniLM and EfficientNet is the slow part, so the feature folder is kept in pytest's cache
between sessions and handed back to `build_features`, which recomputes only rows whose content hash
changed: the first session pays for the encoders once, later ones reuse the rows.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

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
