"""Projections f_t, f_v (EM3 eq. 4-5): each modality's encoder features -> d, token by token.

EM3's public code uses a bare Linear; the GELU + LayerNorm put the 384-d text and 1280-d image tokens
on one scale before they meet in attention.
"""

from __future__ import annotations

import torch
from torch import nn

from common.errors import MMRankError

# name -> (features [B, K, D], mask [B, K] bool); for per-item tables B = num_items + 1, row 0 = padding.
Modalities = dict[str, tuple[torch.Tensor, torch.Tensor]]


class ModalityProjection(nn.Sequential):
    """Linear(D_m -> d) -> GELU -> LayerNorm, applied to every token of one modality."""

    def __init__(self, in_dim: int, d: int):
        super().__init__(nn.Linear(in_dim, d), nn.GELU(), nn.LayerNorm(d))


class Projections(nn.Module):
    """Projects every modality and concatenates the tokens in the order of `dims`."""

    def __init__(self, dims: dict[str, int], d: int):
        super().__init__()
        self.proj = nn.ModuleDict({name: ModalityProjection(dim, d) for name, dim in dims.items()})

    def forward(self, tokens: Modalities) -> tuple[torch.Tensor, torch.Tensor, tuple[int, ...]]:
        """-> (tokens [B, S, d], key_mask [B, S], tokens per modality). Masked tokens are zeroed
        before projection so whatever the cache holds there (even NaN) cannot leak into attention."""
        missing = [name for name in self.proj if name not in tokens]
        if missing:
            raise MMRankError(f"content tower: missing modality features {missing}; got {sorted(tokens)}")
        projected, masks = [], []
        for name, proj in self.proj.items():
            feats, mask = tokens[name]
            torch._assert(feats.dim() == 3, f"{name} features must be [B, K, D]")
            torch._assert(mask.shape == feats.shape[:2], f"{name} mask must be [B, K] like its features")
            mask = mask.bool()
            feats = feats.masked_fill(~mask.unsqueeze(-1), 0.0)
            projected.append(proj(feats))
            masks.append(mask)
        segments = tuple(int(m.shape[1]) for m in masks)
        return torch.cat(projected, 1), torch.cat(masks, 1), segments
