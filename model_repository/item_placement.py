"""Placing a new item in a two-tower model's item table through its item-item kNN graph (FREEDOM's).

A FREEDOM-family model (FREEDOM, EM3 on FREEDOM) scores items by rows that hold an item-item term
h_i = sum_j S_ij R_j: R are the rows its kNN graph propagates (the item ID embeddings, with EM3 also
the multimodal embeddings, after all but the last item-item layer), S the graph of each modality's k
most cosine-similar items mixed by the modality weights, S_ij = 1/k for every neighbour. An item the
model never saw has no ID embedding and no interactions, but its features place it: its row is

    row(x) = sum_m w_m mean(R_j : j among the k table items whose m-features are most similar to x_m)

which is exactly h for an item whose features equal x (the same neighbours, itself excluded, as it
has no R row): a new item is placed where its content neighbours are. The LightGCN term of the row
(propagated from the item's own embedding and interactions) is 0 for it; so is EM3's own multimodal
term (its fusion runs in the trainer, not here). A modality the new item lacks (all-zero or missing
features) contributes nothing, as it is then no item's neighbour in the model either.

Models without an item-item graph (LightGCN, BPR-MF) have no placement: a new id stays unknown to their
table and is ranked last (`candidate_known` False), since they know nothing about an item but its
interactions.

Files (`placement/` in the item table folder), numpy only like the rest of the serving runtime:

    placement.json   format_version, k, the modality weights (another format version is refused)
    ids.npy          int64 [T]       the items that can be neighbours (ascending)
    rows.npy         float32 [T, E]  their R rows
    <modality>.npy   float32 [T, D]  their L2-normalised features (all zero: no such feature)
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import MMRankError

PLACEMENT = "placement"
PLACEMENT_JSON = "placement.json"
FORMAT_VERSION = 1


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows divided by their L2 norm; all-zero rows stay zero."""
    x = np.asarray(x, dtype=np.float32)
    norm = np.linalg.norm(x, axis=1, keepdims=True)
    return np.divide(x, norm, out=np.zeros_like(x), where=norm > 0)


@dataclass
class ItemPlacement:
    k: int
    weights: dict[str, float]  # modality -> weight in the mixed item-item graph
    ids: np.ndarray  # [T] int64
    rows: np.ndarray  # [T, E] float32
    features: dict[str, np.ndarray]  # modality -> [T, D] float32, unit rows (zero: no such feature)

    def __post_init__(self):
        self.ids = np.asarray(self.ids, dtype=np.int64)
        self.rows = np.ascontiguousarray(self.rows, dtype=np.float32)
        t = len(self.ids)
        if self.k < 1 or self.rows.shape[0] != t or set(self.features) != set(self.weights):
            raise MMRankError(
                f"item placement: k {self.k}, ids [{t}], rows {self.rows.shape} and features "
                f"{sorted(self.features)} for weights {sorted(self.weights)} do not fit together"
            )
        for name, feats in self.features.items():
            if feats.ndim != 2 or feats.shape[0] != t:
                raise MMRankError(f"item placement: {name} features {feats.shape}, expected [{t}, D]")

    @property
    def width(self) -> int:
        return int(self.rows.shape[1])

    def dims(self) -> dict[str, int]:
        return {name: int(f.shape[1]) for name, f in self.features.items()}

    def place(self, features: dict[str, np.ndarray]) -> np.ndarray:
        """New items' rows [M, E] from their features {modality: [M, D]} (every modality of `weights`)."""
        missing = sorted(set(self.weights) - set(features))
        if missing:
            raise MMRankError(f"new items need their {', '.join(missing)} features to be placed")
        sizes = {len(np.asarray(f)) for f in features.values()}
        if len(sizes) != 1:
            raise MMRankError(f"new item features disagree on the number of items: {sorted(sizes)}")
        out = np.zeros((sizes.pop(), self.width), np.float64)
        for name, weight in self.weights.items():
            x = np.asarray(features[name], dtype=np.float32)
            if x.ndim != 2 or x.shape[1] != self.features[name].shape[1] or not np.isfinite(x).all():
                raise MMRankError(
                    f"new item {name} features: shape {x.shape}, expected finite [M, {self.features[name].shape[1]}]"
                )
            out += weight * self._modality_term(unit_rows(x), self.features[name])
        return out.astype(np.float32)

    def _modality_term(self, x: np.ndarray, table: np.ndarray) -> np.ndarray:
        """mean of the R rows of each item's k nearest table items in one modality; 0 without features."""
        candidates = np.flatnonzero(table.any(axis=1))
        k = min(self.k, len(candidates))
        term = np.zeros((len(x), self.width))
        present = x.any(axis=1)
        if not k or not present.any():
            return term
        similarity = x[present] @ table[candidates].T
        top = np.argpartition(-similarity, k - 1, axis=1)[:, :k]
        term[present] = self.rows[candidates[top]].mean(axis=1)
        return term

    # ---- files --------------------------------------------------------------------------------------
    def write(self, table_folder: str | Path) -> Path:
        folder = Path(table_folder) / PLACEMENT
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "ids.npy", self.ids)
        np.save(folder / "rows.npy", self.rows)
        for name, feats in self.features.items():
            np.save(folder / f"{name}.npy", np.asarray(feats, dtype=np.float32))
        tmp = folder / f".{PLACEMENT_JSON}.tmp"
        meta = {"format_version": FORMAT_VERSION, "k": self.k, "weights": self.weights}
        tmp.write_text(json.dumps(meta, indent=2, sort_keys=True))
        os.replace(tmp, folder / PLACEMENT_JSON)
        return folder

    @classmethod
    def read(cls, table_folder: str | Path) -> ItemPlacement | None:
        """The placement of the table in `table_folder`; None where its model has none."""
        folder = Path(table_folder) / PLACEMENT
        if not (folder / PLACEMENT_JSON).is_file():
            return None
        try:
            meta = json.loads((folder / PLACEMENT_JSON).read_text())
            if meta["format_version"] != FORMAT_VERSION:
                raise MMRankError(
                    f"{folder / PLACEMENT_JSON}: item placement format_version {meta['format_version']!r}, "
                    f"this version reads {FORMAT_VERSION}; export the run again"
                )
            weights = {str(k): float(v) for k, v in meta["weights"].items()}
            arrays = {
                name: np.load(folder / f"{name}.npy", allow_pickle=False)
                for name in ("ids", "rows", *weights)
            }
            return cls(
                int(meta["k"]), weights, arrays["ids"], arrays["rows"], {n: arrays[n] for n in weights}
            )
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise MMRankError(f"{folder}: unreadable item placement ({type(e).__name__}: {e})") from e
