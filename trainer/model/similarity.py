"""LEMUR similarity features: s_i = cos(c, c_ui) over the history and its sorted copy (top-k).

The ranker needs a fixed width whatever the history length, so the features are 2k numbers:
- the k most recent similarities (histories are right-aligned, most recent last), in history order;
- the k largest similarities, descending (the "ranked copy" LEMUR reports stabilises training).
Positions without an item are 0 in both halves and sort after every present item; histories shorter
than k are padded the same way. k is static, so the graph exports with a dynamic history length.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def history_cosine(target: Tensor, history: Tensor, mask: Tensor) -> Tensor:
    """cos(target, history_i): target [B, (N,) d], history [B, L, d], mask [B, L] -> [B, (N,) L],
    0 where the mask is False."""
    single = target.dim() == 2
    t = F.normalize(target[:, None] if single else target, dim=-1)
    s = t @ F.normalize(history, dim=-1).transpose(1, 2)
    s = s.masked_fill(~mask[:, None, :], 0.0)
    return s[:, 0] if single else s


def similarity_features(target: Tensor, history: Tensor, mask: Tensor, topk: int) -> Tensor:
    """[B, (N,) 2 * topk]: the topk most recent cosines, then the topk largest in descending order."""
    s = history_cosine(target, history, mask)
    present = mask if target.dim() == 2 else mask[:, None, :]
    present = present.expand_as(s)
    # k absent slots in front guarantee at least k columns for any history length.
    s = torch.cat([s.new_zeros(*s.shape[:-1], topk), s], dim=-1)
    present = torch.cat([present.new_zeros(*present.shape[:-1], topk), present], dim=-1)
    recent = s[..., -topk:]
    top, idx = torch.topk(s.masked_fill(~present, float("-inf")), topk, dim=-1)
    ranked = top.masked_fill(~present.gather(-1, idx), 0.0)
    return torch.cat([recent, ranked], dim=-1)
