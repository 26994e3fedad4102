"""LEMUR's sequence decoder (adapted from LONGER): global query tokens cross-attend to the history.

Q query tokens of width d are built by one linear map from the non-sequence features (the model passes
user embeddings and the target content vector). Each layer does

    Q <- LN(Q + CrossAttn(Q, history));  Q <- LN(Q + FFN(Q))

with K/V projections of the history and sqrt(d_head) scaling (the paper's formula omits both; an
implementation needs them). There is no self-attention over the history, so cost is
linear in L; an empty history contributes nothing (attention output 0, never NaN).
"""

from __future__ import annotations

from torch import Tensor, nn

from trainer.model.attention import check_impl, masked_attention, merge_heads, split_heads


class CrossAttentionLayer(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float, impl: str):
        super().__init__()
        if d % heads:
            raise ValueError(f"content dim {d} is not divisible by {heads} decoder heads")
        self.heads, self.attention_impl = heads, check_impl(impl)
        self.scale = (d // heads) ** -0.5
        self.query, self.key, self.value, self.out = (nn.Linear(d, d) for _ in range(4))
        self.norm_attn, self.norm_ffn = nn.LayerNorm(d), nn.LayerNorm(d)
        self.ffn = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(dropout), nn.Linear(4 * d, d))
        self.dropout = nn.Dropout(dropout)

    def forward(self, queries: Tensor, history: Tensor, mask: Tensor) -> Tensor:
        """queries [B, T, d], history [B, L, d], mask [B, L] -> [B, T, d]."""
        q, k, v = (
            split_heads(lin(x), self.heads)
            for lin, x in ((self.query, queries), (self.key, history), (self.value, history))
        )
        attn = merge_heads(masked_attention(q, k, v, mask, self.scale, self.attention_impl))
        x = self.norm_attn(queries + self.dropout(self.out(attn)))
        return self.norm_ffn(x + self.dropout(self.ffn(x)))


class CrossAttentionDecoder(nn.Module):
    """context [B, (N,) context_dim] + history [B, L, d] -> [B, (N,) num_queries * d].

    With N candidates per history, the N * num_queries query tokens of a row attend to the same
    history in one call, so the history's K/V projections are computed once per row.
    """

    def __init__(
        self,
        d: int,
        context_dim: int,
        num_queries: int,
        layers: int,
        heads: int = 1,
        dropout: float = 0.0,
        impl: str = "sdpa",
    ):
        super().__init__()
        self.d, self.num_queries = d, num_queries
        self.query_tokens = nn.Linear(context_dim, num_queries * d)
        self.layers = nn.ModuleList(CrossAttentionLayer(d, heads, dropout, impl) for _ in range(layers))

    @property
    def out_dim(self) -> int:
        return self.num_queries * self.d

    def forward(self, context: Tensor, history: Tensor, mask: Tensor) -> Tensor:
        single = context.dim() == 2
        if single:
            context = context[:, None]
        tokens = self.query_tokens(context).unflatten(-1, (self.num_queries, self.d))  # [B, N, Q, d]
        x = tokens.flatten(1, 2)
        for layer in self.layers:
            x = layer(x, history, mask)
        out = x.unflatten(1, (-1, self.num_queries)).flatten(-2)
        return out[:, 0] if single else out
