"""FQ-Former (EM3 eq. 6): c = Linear(flatten(TRM(concat([q_1..q_Q, v_1..v_M, t_1..t_K]))[:Q])).

Follows the public EM3 code (`src/common/transformer.py`, see the LEMUR digest §2):
- Q learnable queries of shape (1, Q, d), Xavier-uniform, prepended to the modality tokens;
- each layer is a BERT-style self-attention block: Q/K/V linears, scores / sqrt(head_dim + 1e-5),
  softmax with attention dropout 0, then dense -> dropout -> residual -> LayerNorm (eps 1e-5);
- the first Q outputs, flattened, go through `mm_proj` = Linear(Q * d -> d), Xavier-initialised.

FFN: the public code has no feed-forward block after the attention (the paper only says
"transformers"), so `ffn_mult` defaults to 0 = none; > 0 adds a BERT FFN block (Linear d -> ffn_mult * d,
GELU, Linear back, dropout, residual, LayerNorm) after every attention block.

Masked tokens (a missing modality, padding) are removed as keys. The queries are always keys, so an
item with every modality missing still gets a finite vector: its queries attend to themselves.

The attention primitives here are shared by every fusion variant (fusion_variants.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

ATTENTION_BACKENDS = ("sdpa", "reference")
LAYER_NORM_EPS = 1e-5


def _safe_key_mask(key_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """key_mask [B, Sk] -> (attention mask [B, 1, 1, Sk], has_key [B, 1, 1, 1]).

    A row without any key would softmax over nothing (NaN, and NaN * 0 is still NaN); such rows attend
    to every key instead and their output is zeroed afterwards with `has_key`.
    """
    has_key = key_mask.any(-1)
    safe = key_mask | ~has_key.unsqueeze(-1)
    return safe[:, None, None, :], has_key[:, None, None, None]


def attention_reference(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """Plain masked softmax attention: the reference the SDPA path is tested against."""
    safe, has_key = _safe_key_mask(key_mask)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    probs = scores.masked_fill(~safe, float("-inf")).softmax(-1)
    return torch.matmul(probs, v) * has_key.to(v.dtype)


def attention_sdpa(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_mask: torch.Tensor, scale: float
) -> torch.Tensor:
    """The same through torch's scaled_dot_product_attention (fused kernels where available)."""
    safe, has_key = _safe_key_mask(key_mask)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe, scale=scale)
    return out * has_key.to(v.dtype)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_mask: torch.Tensor,
    scale: float,
    backend: str = "sdpa",
) -> torch.Tensor:
    """q [B, H, Sq, Dh], k and v [B, H, Sk, Dh], key_mask [B, Sk] bool (True = may be attended to)
    -> [B, H, Sq, Dh]. Query rows with no key at all get zeros."""
    if backend == "sdpa":
        return attention_sdpa(q, k, v, key_mask, scale)
    if backend == "reference":
        return attention_reference(q, k, v, key_mask, scale)
    raise ValueError(f"unknown attention backend {backend!r}; expected one of {ATTENTION_BACKENDS}")


def set_attention_backend(module: nn.Module, backend: str) -> None:
    """Switch every MultiHeadAttention inside `module` to `backend` ('sdpa' or 'reference')."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; expected one of {ATTENTION_BACKENDS}")
    for sub in module.modules():
        if isinstance(sub, MultiHeadAttention):
            sub.backend = backend


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
        self.backend = "sdpa"

    def _split(self, x: torch.Tensor) -> torch.Tensor:
        b, s, d = x.shape
        return x.reshape(b, s, self.heads, d // self.heads).transpose(1, 2)

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
        q, k, v = self._split(self.query(x)), self._split(self.key(context)), self._split(self.value(context))
        if value_keep is not None:
            v = v * value_keep[:, None, :, None].to(v.dtype)
        out = attention(q, k, v, key_mask, self.scale, self.backend)
        return out.transpose(1, 2).flatten(2)


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
