"""The item table of a trained model (and, for a two-tower model, its user table and the placement of
new items). The table format and the lookup are the serving runtime's (model_repository/item_table.py,
model_repository/item_placement.py); building one needs torch and the trainer, so it lives here."""

from __future__ import annotations

import numpy as np

from model_repository.item_placement import ItemPlacement, unit_rows
from model_repository.item_table import ItemTable


def build_item_table(
    model, num_items: int, source: dict | None = None, user_feats: np.ndarray | None = None
) -> ItemTable:
    """The table of a trained model for ids 0..num_items, computed in eval mode; `user_feats` is the
    dataset's user table. RankingModel: `item_vectors` (bank, else tower) and the ranker's item token;
    a two-tower model: its propagated item vectors as the item rows (no content)."""
    import torch

    from trainer.evaluate import is_two_tower, item_vectors

    model.eval()
    content = rows = None
    with torch.inference_mode():
        if is_two_tower(model):
            rows = model.tables()[1].float().numpy()
        else:
            if model.tower is not None:
                content = item_vectors(model, num_items).float().cpu().numpy()
            if model.ranker.item_dim:
                ids = torch.arange(num_items + 1, dtype=torch.int64)
                rows = torch.cat([model.ranker.item_features(part) for part in ids.split(4096)]).numpy()
    return ItemTable(np.arange(num_items + 1, dtype=np.int64), content, rows, 1, source, user_feats)


def build_user_table(model) -> np.ndarray:
    """A two-tower model's propagated user vectors [num_users + 1, E] (row 0: the unknown user, zeros)."""
    import torch

    model.eval()
    with torch.inference_mode():
        return model.tables()[0].float().numpy()


def build_placement(model) -> ItemPlacement | None:
    """How the table places new items (a model with an item-item graph: FREEDOM, EM3 on FREEDOM); None
    for a model without one (LightGCN), whose table leaves new ids unknown."""
    import torch

    if not hasattr(model, "placement") or model.cfg.graph.item_layers < 1:
        return None
    model.eval()
    with torch.inference_mode():
        rows, features, weights = model.placement()
        unit = {
            name: unit_rows((feats * present[:, None]).numpy()) for name, (feats, present) in features.items()
        }
    ids = np.arange(1, model.schema.num_items + 1, dtype=np.int64)
    return ItemPlacement(model.cfg.graph.knn_k, weights, ids, rows.detach().float().numpy(), unit)
