"""The fusion methods of EM3 Table 3 behind one option (`ContentConfig.fusion`).

Every fusion has the call signature

    fusion(tokens [B, S, d], key_mask [B, S] bool, segments=(tokens per modality, ...)) -> c [B, d]

where the tokens are the projected modality tokens concatenated in `ContentConfig.modalities` order
and `segments` says how many of them each modality has (only `2flow` needs it).

- `fq_former`: FQ-Former (EM3 eq. 6), fq_former.py.
- `masked`: FQ-Former whose query values are excluded from the attention pooling.
- `mean`: masked mean of the projected tokens; no parameters of its own.
- `1flow` [EM3 ref 19]: concat + transformer over the modality tokens, the padded output sequence
  masked-mean-pooled.
- `2flow` [EM3 ref 29, LXMERT-style]: two streams (the first modality's tokens and the second's), each
  layer a cross-attention to the other stream then self-attention, independent weights per stream;
  each stream masked-mean-pooled and the two summed. The paper keeps only the text flow's output;
  summing keeps the image when text is missing.
"""

from __future__ import annotations

import torch
from torch import nn

from common.errors import MMRankError
from trainer.model.config import ContentConfig
from trainer.model.fq_former import AttentionBlock, FQFormer, FusionLayer

FUSIONS = ("fq_former", "masked", "mean", "1flow", "2flow")


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """x [B, S, d], mask [B, S] -> [B, d]; a row without any kept token gives zeros."""
    weights = mask.to(x.dtype).unsqueeze(-1)
    return (x * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class MeanFusion(nn.Module):
    def forward(
        self, tokens: torch.Tensor, key_mask: torch.Tensor, segments: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        return masked_mean(tokens, key_mask)


class OneFlowFusion(nn.Module):
    def __init__(self, d: int, layers: int, heads: int, dropout: float, ffn_mult: int):
        super().__init__()
        self.layers = nn.ModuleList(FusionLayer(d, heads, dropout, ffn_mult) for _ in range(layers))

    def forward(
        self, tokens: torch.Tensor, key_mask: torch.Tensor, segments: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        x = tokens
        for layer in self.layers:
            x = layer(x, key_mask)
        return masked_mean(x, key_mask)


class TwoFlowLayer(nn.Module):
    """Per stream: cross-attention to the other stream, then self-attention (+ FFN)."""

    def __init__(self, d: int, heads: int, dropout: float, ffn_mult: int):
        super().__init__()
        self.cross = nn.ModuleList(AttentionBlock(d, heads, dropout) for _ in range(2))
        self.own = nn.ModuleList(FusionLayer(d, heads, dropout, ffn_mult) for _ in range(2))

    def forward(
        self, a: torch.Tensor, a_mask: torch.Tensor, b: torch.Tensor, b_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # Both cross-attentions read the inputs of this layer, so neither stream sees the other twice.
        a_cross = self.cross[0](a, b, b_mask)
        b_cross = self.cross[1](b, a, a_mask)
        return self.own[0](a_cross, a_mask), self.own[1](b_cross, b_mask)


class TwoFlowFusion(nn.Module):
    def __init__(self, d: int, layers: int, heads: int, dropout: float, ffn_mult: int):
        super().__init__()
        self.layers = nn.ModuleList(TwoFlowLayer(d, heads, dropout, ffn_mult) for _ in range(layers))

    def forward(
        self, tokens: torch.Tensor, key_mask: torch.Tensor, segments: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        if segments is None or len(segments) != 2 or sum(segments) != tokens.shape[1]:
            raise ValueError(
                f"2flow fusion needs exactly two modalities whose token counts add up to {tokens.shape[1]}, "
                f"got segments={segments}"
            )
        a, b = tokens.split(list(segments), 1)
        a_mask, b_mask = key_mask.split(list(segments), 1)
        for layer in self.layers:
            a, b = layer(a, a_mask, b, b_mask)
        return masked_mean(a, a_mask) + masked_mean(b, b_mask)


def build_fusion(cfg: ContentConfig) -> nn.Module:
    """The fusion module `cfg.fusion` names, sized by the config."""
    d, layers, heads, dropout, ffn = cfg.d, cfg.fusion_layers, cfg.fusion_heads, cfg.dropout, cfg.fusion_ffn
    if cfg.fusion in ("fq_former", "masked"):
        return FQFormer(
            d, cfg.num_queries, layers, heads, dropout, ffn, pool_query_values=cfg.fusion == "fq_former"
        )
    if cfg.fusion == "mean":
        return MeanFusion()
    if cfg.fusion == "1flow":
        return OneFlowFusion(d, layers, heads, dropout, ffn)
    if cfg.fusion == "2flow":
        if len(cfg.modalities) != 2:
            raise MMRankError(f"2flow fusion needs exactly two modalities, got {list(cfg.modalities)}")
        return TwoFlowFusion(d, layers, heads, dropout, ffn)
    raise MMRankError(f"unknown fusion {cfg.fusion!r}; expected one of {FUSIONS}")
