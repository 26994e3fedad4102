"""Target attention over a history of content vectors (EM3 eq. 7-8).

    u = sum_i softmax_i(a(c, c_ui)) c_ui,   a(c, c_ui) = <W_q c, W_k c_ui> / sqrt(d_head)

Values are the history vectors themselves (eq. 7 has no value projection), so u lives in the content
space. With H heads, W_q c and W_k c_ui are split into H slices of d / H and head h weights slice h of
c_ui: multi-head attention with identity value and output maps. N candidates may share one history
(serving scores N candidates per request): target [B, N, d] against history [B, L, d].

With attention_impl "fused" the key projection is folded into the query: per head h,
<q_h, W_k[h] c_ui + b_k[h]> = <W_k[h]^T q_h, c_ui> + <q_h, b_k[h]>, and the last term is the same for
every history position, so it cancels in the softmax. Keys and values are then both the raw history,
which the kernel reads once, together with LEMUR's cosine features (`with_similarity`).

A history with no item (all-False mask row) gives u = 0, never NaN, in every implementation.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trainer.kernels.attention_op import attention_cosine_op
from trainer.model.attention import check_impl, masked_attention, merge_heads, split_heads
from trainer.model.similarity import similarity_features


class TargetAttention(nn.Module):
    """EM3 user content interest u for a target c [B, d] or N candidates [B, N, d]."""

    def __init__(self, d: int, heads: int = 1, impl: str = "sdpa"):
        super().__init__()
        if d % heads:
            raise ValueError(f"content dim {d} is not divisible by {heads} attention heads")
        self.heads, self.attention_impl = heads, check_impl(impl)
        self.scale = (d // heads) ** -0.5  # a Python float: a constant in traced graphs
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)

    def forward(self, target: Tensor, history: Tensor, mask: Tensor) -> Tensor:
        """target [B, (N,) d], history [B, L, d], mask [B, L] bool -> u [B, (N,) d]."""
        single = target.dim() == 2
        out = self._attend(target[:, None] if single else target, history, mask)
        return out[:, 0] if single else out

    def with_similarity(
        self, target: Tensor, history: Tensor, mask: Tensor, topk: int
    ) -> tuple[Tensor, Tensor]:
        """(u [B, N, d], LEMUR similarity features [B, N, 2 * topk]) for target [B, N, d]; one pass
        over the history with the fused kernel (one head), the two computations otherwise."""
        if self.attention_impl == "fused" and self.heads == 1:
            q = self._folded_query(target)
            out, features, _, _ = attention_cosine_op(q, history, mask, target, 1.0, topk)
            return out, features
        return self._attend(target, history, mask), similarity_features(target, history, mask, topk)

    def _attend(self, target: Tensor, history: Tensor, mask: Tensor) -> Tensor:
        if self.attention_impl == "fused":
            b, length, d = history.shape
            keys = history[:, None].expand(b, self.heads, length, d)
            out = masked_attention(
                self._folded_query(target), keys, split_heads(history, self.heads), mask, 1.0, "fused"
            )
        else:
            q = split_heads(self.query(target), self.heads)
            k = split_heads(self.key(history), self.heads)
            out = masked_attention(
                q, k, split_heads(history, self.heads), mask, self.scale, self.attention_impl
            )
        return merge_heads(out)

    def _folded_query(self, target: Tensor) -> Tensor:
        """Per head W_k[h]^T q_h / sqrt(d_head): [B, N, d] -> [B, H, N, d], scores against the raw history."""
        d = target.shape[-1]
        dh = d // self.heads
        q = self.query(target).unflatten(-1, (self.heads, dh))
        w = self.key.weight.view(self.heads, dh, d).to(q.dtype)
        return torch.einsum("bnhe,hed->bhnd", q, w) * self.scale
