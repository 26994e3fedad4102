"""FQ-Former (EM3 eq. 6): c = Linear(flatten(TRM(concat([q_1..q_Q, v_1..v_M, t_1..t_K]))[:Q])).

Follows the public EM3 code (`src/common/transformer.py`):
- Q learnable queries of shape (1, Q, d), Xavier-uniform, prepended to the modality tokens;
- each layer is a BERT-style self-attention block: Q/K/V linears, scores / sqrt(head_dim + 1e-5),
  softmax with attention dropout 0, then dense -> dropout -> residual -> LayerNorm (eps 1e-5);
- the first Q outputs, flattened, go through `mm_proj` = Linear(Q * d -> d), Xavier-initialised.

FFN: the public code has no feed-forward block after the attention (the paper only says
"transformers"), so `ffn_mult` defaults to 0 = none; > 0 adds a BERT FFN block (Linear d -> ffn_mult * d,
GELU, Linear back, dropout, residual, LayerNorm) after every attention block.

Masked tokens (a missing modality, padding) are removed as keys. The queries are always keys, so an
item with every modality missing still gets a finite vector: its queries attend to themselves.

Attention runs through trainer.model.attention (one entry point, reference / sdpa / fused).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from trainer.model.attention import masked_attention, merge_heads, split_heads

LAYER_NORM_EPS = 1e-5


class MultiHeadAttention(nn.Module):
    """BERT attention (EM3 code's `BertAttention`): x attends to context, which may be x itself."""

    def __init__(self, d: int, heads: int):
        super().__init__()
        if d % heads:
            raise ValueError(f"d={d} is not divisible by heads={heads}")
        self.heads = heads
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)
        self.value = nn.Linear(d, d)
        # EM3's code divides by sqrt(head_dim + 1e-5), not sqrt(head_dim); kept for fidelity.
        self.scale = 1.0 / math.sqrt(d // heads + 1e-5)
        self.attention_impl = "sdpa"

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        key_mask: torch.Tensor,
        value_keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """x [B, Sq, d], context [B, Sk, d], key_mask [B, Sk] -> [B, Sq, d].

        value_keep [B, Sk] (optional) zeroes the values of the context tokens it marks False: those
        tokens still take attention weight through Q.K but contribute nothing to the output.
        """
        q, k, v = (
            split_heads(lin(t), self.heads)
            for lin, t in ((self.query, x), (self.key, context), (self.value, context))
        )
        if value_keep is not None:
            v = v * value_keep[:, None, :, None].to(v.dtype)
        return merge_heads(masked_attention(q, k, v, key_mask, self.scale, self.attention_impl))


class AttentionBlock(nn.Module):
    """Attention -> dense -> dropout -> residual -> LayerNorm (EM3 code's `SelfattLayer`)."""

    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.attention = MultiHeadAttention(d, heads)
        self.dense = nn.Linear(d, d)
        self.dropout = nn.Dropout(dropout)
        self.norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS)

    def forward(
        self,
        x: torch.Tensor,
        context: torch.Tensor,
        key_mask: torch.Tensor,
        value_keep: torch.Tensor | None = None,
    ) -> torch.Tensor:
        attended = self.attention(x, context, key_mask, value_keep)
        return self.norm(x + self.dropout(self.dense(attended)))


class FeedForward(nn.Module):
    """BERT feed-forward block: Linear -> GELU -> Linear -> dropout -> residual -> LayerNorm."""

    def __init__(self, d: int, mult: int, dropout: float):
        super().__init__()
        self.net = nn.Sequential(
            nn.Linear(d, mult * d), nn.GELU(), nn.Linear(mult * d, d), nn.Dropout(dropout)
        )
        self.norm = nn.LayerNorm(d, eps=LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.net(x))


class FusionLayer(nn.Module):
    """One transformer layer over a token sequence: self-attention block, then the optional FFN."""

    def __init__(self, d: int, heads: int, dropout: float, ffn_mult: int = 0):
        super().__init__()
        self.attention = AttentionBlock(d, heads, dropout)
        self.ffn = FeedForward(d, ffn_mult, dropout) if ffn_mult > 0 else nn.Identity()

    def forward(
        self, x: torch.Tensor, key_mask: torch.Tensor, value_keep: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.ffn(self.attention(x, x, key_mask, value_keep))


class FQFormer(nn.Module):
    """tokens [B, S, d] (projected modality tokens), key_mask [B, S] -> c [B, d].

    `pool_query_values=False` is the "masked FQ-Former" of EM3 Table 3: the queries still take part in
    Q.K (so they can absorb attention away from weak modalities) but their values are zeroed, so what
    the query outputs pool is the modality tokens only (plus the residual of the query itself).
    """

    def __init__(
        self,
        d: int,
        num_queries: int = 2,
        layers: int = 1,
        heads: int = 4,
        dropout: float = 0.1,
        ffn_mult: int = 0,
        pool_query_values: bool = True,
    ):
        super().__init__()
        if num_queries < 1 or layers < 1:
            raise ValueError(f"FQ-Former needs num_queries >= 1 and layers >= 1, got {num_queries}, {layers}")
        self.num_queries = num_queries
        self.pool_query_values = pool_query_values
        self.queries = nn.Parameter(nn.init.xavier_uniform_(torch.empty(1, num_queries, d)))
        self.layers = nn.ModuleList(FusionLayer(d, heads, dropout, ffn_mult) for _ in range(layers))
        self.out = nn.Linear(num_queries * d, d)
        nn.init.xavier_uniform_(self.out.weight)

    def forward(
        self, tokens: torch.Tensor, key_mask: torch.Tensor, segments: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        """`segments` (tokens per modality) is part of the shared fusion signature; self-attention
        without position embeddings does not need it."""
        torch._assert(tokens.dim() == 3, "FQ-Former tokens must be [B, S, d]")
        b, q = tokens.shape[0], self.num_queries
        x = torch.cat([self.queries.expand(b, -1, -1).to(tokens.dtype), tokens], 1)
        query_mask = torch.ones(b, q, dtype=torch.bool, device=tokens.device)
        mask = torch.cat([query_mask, key_mask], 1)
        value_keep = (
            None if self.pool_query_values else torch.cat([~query_mask, torch.ones_like(key_mask)], 1)
        )
        for layer in self.layers:
            x = layer(x, mask, value_keep)
        return self.out(x[:, :q].flatten(1))
