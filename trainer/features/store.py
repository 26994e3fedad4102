"""Item features as the model sees them: every modality a token sequence with a mask.

`load_item_features` joins the frozen-encoder cache (`<data>/features/`, built by `mmrank features`)
with the dataset's precomputed `manifest.item_features` (MMRec `*_feat.npy`, [n+1, D], one token
each), so the content tower consumes cached text, cached images and MMRec vectors the same way.
Arrays are memory-mapped; row i = item_id i and row 0 is padding (zeros, masked out).
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import DataError
from trainer.data.schema import Manifest
from trainer.features import image, text
from trainer.features.runtime import sha256_files

FEATURES = "features"  # the cache folder name, shared with trainer.features.cache
META = "meta.json"
# 2: each modality's settings hold the encoder runtime. `mmrank features` recomputes a cache of another
# version; training refuses it.
CACHE_VERSION = 2
CACHE_MODALITIES = ("text", "image")


@functools.cache
def encoder_weights_sha256(modality: str) -> str:
    """The digest of the installed encoder's files (weights, config, vocabulary) that a cache's rows must
    have been computed with. Hashed once per process: the installed packages do not change under it."""
    if modality == "text":
        return sha256_files(text.text_weights_files())
    return sha256_files([image.image_weights_path()])


@dataclass
class ItemFeatures:
    num_items: int
    # name -> (features [n+1, K, D] float32, mask [n+1, K] bool); K tokens of width D per item
    modalities: dict[str, tuple[np.ndarray, np.ndarray]]

    def dims(self) -> dict[str, tuple[int, int]]:
        """name -> (K, D)."""
        return {name: (f.shape[1], f.shape[2]) for name, (f, _) in self.modalities.items()}


def load_item_features(data_dir: str | Path) -> ItemFeatures:
    root = Path(data_dir)
    manifest = Manifest.read(root)
    n = manifest.counts["items"]
    modalities = _cached(root, manifest, n)
    for name, rel in manifest.item_features.items():
        if name in modalities:
            raise DataError(root / rel, f"precomputed feature {name!r} clashes with the cached modality")
        modalities[name] = _precomputed(root / rel, n)
    return ItemFeatures(n, modalities)


def _cached(root: Path, manifest: Manifest, n: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    expected = [
        m
        for m, wanted in zip(CACHE_MODALITIES, (manifest.text_fields, manifest.has_images), strict=True)
        if wanted
    ]
    if not expected:
        return {}
    out = root / FEATURES
    rerun = f"run `mmrank features --data {root}` first"
    try:
        meta = json.loads((out / META).read_text())
    except (OSError, ValueError) as e:
        raise DataError(out, f"no readable feature cache ({type(e).__name__}); {rerun}") from e
    if meta.get("version") != CACHE_VERSION:
        raise DataError(
            out / META,
            f"feature cache version {meta.get('version')!r}, this version reads {CACHE_VERSION}; {rerun}",
        )
    if meta.get("num_items") != n:
        raise DataError(out, f"stale feature cache: {meta.get('num_items')} items, dataset has {n}; {rerun}")
    text_fields = meta.get("modalities", {}).get("text", {}).get("settings", {}).get("fields")
    if manifest.text_fields and text_fields != manifest.text_fields:
        raise DataError(
            out,
            f"stale feature cache: text fields {text_fields}, dataset has {manifest.text_fields}; {rerun}",
        )
    result = {}
    for name in expected:
        if name not in meta.get("modalities", {}):
            raise DataError(out, f"stale feature cache: no {name} features; {rerun}")
        settings = meta["modalities"][name].get("settings", {})
        if settings.get("weights_sha256") != encoder_weights_sha256(name):
            raise DataError(
                out / META,
                f"stale feature cache: the {name} features were computed with other "
                f"{settings.get('encoder', 'encoder')} weights than the installed ones; {rerun}",
            )
        try:
            feats = np.load(out / f"{name}.npy", mmap_mode="r")
            mask = np.load(out / f"{name}_mask.npy")
        except (OSError, ValueError) as e:
            raise DataError(out / f"{name}.npy", f"unreadable feature array ({e}); {rerun}") from e
        if feats.ndim != 3 or feats.shape[0] != n + 1 or mask.shape != feats.shape[:2]:
            raise DataError(
                out / f"{name}.npy",
                f"stale feature cache: shape {feats.shape}, mask {mask.shape}, "
                f"expected [{n + 1}, K, D]; {rerun}",
            )
        result[name] = (feats, mask.astype(bool, copy=False))
    return result


def _precomputed(path: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """[n+1, D] -> one token per item; an all-zero row (padding, an item without content) is masked."""
    try:
        array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
        raise DataError(path, f"unreadable .npy ({e})") from e
    if array.ndim != 2 or array.shape[0] != n + 1:
        raise DataError(path, f"shape {array.shape}, expected [{n + 1}, D] (row 0 = padding)")
    feats = np.asarray(array, dtype=np.float32)
    mask = np.any(feats != 0, axis=1)
    return feats[:, None, :], mask[:, None]
