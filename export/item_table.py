"""The item table of a trained model. The table format and the lookup are the serving runtime's
(model_repository/item_table.py); building one needs torch and the trainer, so it lives here."""

from __future__ import annotations

import numpy as np

from model_repository.item_table import ItemTable


def build_item_table(
    model, num_items: int, source: dict | None = None, user_feats: np.ndarray | None = None
) -> ItemTable:
    """The table of a trained RankingModel: `item_vectors` (bank, else tower) and the ranker's item
    token for ids 0..num_items, computed in eval mode; `user_feats` is the dataset's user table."""
    import torch

    from trainer.evaluate import item_vectors

    model.eval()
    content = rows = None
    with torch.inference_mode():
        if model.tower is not None:
            content = item_vectors(model, num_items).float().cpu().numpy()
        if model.ranker.item_dim:
            ids = torch.arange(num_items + 1, dtype=torch.int64)
            rows = torch.cat([model.ranker.item_features(part) for part in ids.split(4096)]).numpy()
    return ItemTable(np.arange(num_items + 1, dtype=np.int64), content, rows, 1, source, user_feats)
