"""Fixed per-item content tables for `ContentConfig.source == "fixed"` (the pe / task_pe baselines).

- pe: `pca_table` reduces the frozen encoder features to d without any training signal.
- task_pe: the trainer runs a trained ContentTower over every id and saves the result.
Both are .npy files [num_items + 1, d] float32 with row 0 (padding) all zeros.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np

from common.errors import DataError, MMRankError
from trainer.model.projections import Modalities


def _masked_mean(feats: np.ndarray, mask: np.ndarray) -> np.ndarray:
    weights = mask.astype(np.float64)[..., None]
    return (feats * weights).sum(1) / np.maximum(weights.sum(1), 1.0)


def pca_table(modalities: Modalities, d: int) -> np.ndarray:
    """The pe table: per modality the masked mean over its tokens, concatenated, standardised, PCA to d.

    Each modality's columns are standardised over the items that have it, and items without it get
    the mean (0 after standardising). Components are the right singular vectors of the centred matrix
    (a thin SVD costs min(items, dims)^2 x max(items, dims), fast in both regimes), signs fixed
    so the largest loading of each is positive, and the table is scaled to unit variance per dimension
    on average, the scale of the LayerNormed tower outputs. Row 0 is zeros.
    """
    if not modalities:
        raise MMRankError("pca_table: no modality features given")
    blocks = []
    for name, (feats, mask) in modalities.items():
        f = feats.detach().cpu().double().numpy()[1:]
        m = mask.detach().cpu().bool().numpy()[1:]
        if f.ndim != 3 or m.shape != f.shape[:2]:
            raise MMRankError(f"pca_table: {name} must be features [n+1, K, D] with mask [n+1, K]")
        pooled = _masked_mean(f, m)
        present = m.any(1)
        if present.any():
            mean = pooled[present].mean(0)
            std = pooled[present].std(0)
            pooled = np.where(present[:, None], (pooled - mean) / np.where(std > 0, std, 1.0), 0.0)
        blocks.append(pooled)
    x = np.concatenate(blocks, 1)
    if d > min(x.shape):
        raise MMRankError(
            f"pca_table: d={d} exceeds the rank bound min(items, feature dims) = {min(x.shape)}"
        )
    x = x - x.mean(0)
    components = np.linalg.svd(x, full_matrices=False)[2][:d].T
    signs = np.sign(components[np.abs(components).argmax(0), np.arange(d)])
    reduced = x @ (components * signs)
    reduced /= max(np.sqrt((reduced**2).mean()), 1e-12)
    table = np.zeros((x.shape[0] + 1, d), dtype=np.float32)
    table[1:] = reduced
    return table


def load_content_table(path: str | Path, d: int, rows: int | None = None) -> np.ndarray:
    """Read and check a fixed table: float [rows, d] (rows = num_items + 1 when known), finite."""
    path = Path(path)
    if not path.is_file():
        raise DataError(path, "fixed content table not found")
    try:
        table = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DataError(path, f"not a readable .npy file ({err})") from err
    if table.ndim != 2 or table.shape[1] != d:
        raise DataError(path, f"expected a table [num_items + 1, {d}], got shape {table.shape}")
    if rows is not None and table.shape[0] != rows:
        raise DataError(path, f"has {table.shape[0]} rows, the dataset needs {rows} (num_items + 1)")
    if not np.issubdtype(table.dtype, np.floating) or not np.isfinite(table).all():
        raise DataError(path, "must hold finite floating-point values")
    return table.astype(np.float32)


def save_content_table(table: np.ndarray, path: str | Path) -> None:
    """Write a table atomically (temp file in the same folder, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npy.tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, np.asarray(table, dtype=np.float32))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
