"""The one batch type that flows from the sample builder through the model to export.

Histories are dense, right-aligned id matrices: row b holds the user's last L positive items before the
event, oldest first and most recent in the last column; shorter histories are padded with PAD_ID (0) on
the left, and `hist_mask` is True where an item is present. Item content and item categoricals are not in
the batch: the model looks them up by item id, exactly as the serving lookup step does.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch


@dataclass
class Batch:
    user_id: torch.Tensor  # [B] int64
    item_id: torch.Tensor  # [B] int64, the target (candidate) item
    label: torch.Tensor  # [B] float32, 1 = click
    request_id: torch.Tensor  # [B] int64, groups impressions shown together (GAUC, SQDC mask)
    user_feats: torch.Tensor  # [B, U] int64 categorical user features (0 = unknown)
    hist_ids: torch.Tensor  # [B, L] int64 short history, right-aligned, 0 = padding
    hist_mask: torch.Tensor  # [B, L] bool
    long_hist_ids: torch.Tensor | None = None  # [B, L_long] for the LoRA / long-sequence phase
    long_hist_mask: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        return Batch(**{f.name: _move(getattr(self, f.name), device) for f in fields(self)})

    def __len__(self) -> int:
        return int(self.item_id.shape[0])


def _move(x, device):
    return None if x is None else x.to(device, non_blocking=True)
