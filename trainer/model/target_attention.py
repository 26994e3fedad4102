"""Target attention over a history of content vectors (EM3 eq. 7-8), and the masked attention it runs on.

    u = sum_i softmax_i(a(c, c_ui)) c_ui,   a(c, c_ui) = <W_q c, W_k c_ui> / sqrt(d_head)

Values are the history vectors themselves (eq. 7 has no value projection), so u lives in the content
space. With H heads, W_q c and W_k c_ui are split into H slices of d / H and head h weights slice h of
c_ui: multi-head attention with identity value and output maps. N candidates may share one history
(serving scores N candidates per request): target [B, N, d] against history [B, L, d].

A history with no item (all-False mask row) gives u = 0, never NaN, in every implementation.
`masked_attention` is the one dispatch point: "sdpa" (torch's fused scaled_dot_product_attention) is
the fast path and "reference" the plain masked softmax it is tested against.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

ATTENTION_IMPLS = ("sdpa", "reference")


def masked_attention(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, impl: str = "sdpa") -> Tensor:
    """Scaled dot-product attention of q [B, H, N, dk] over k [B, H, L, dk], v [B, H, L, dv] where
    mask [B, L] is True; [B, H, N, dv], zeros for rows whose mask is all False."""
    if impl == "reference":
        return masked_attention_reference(q, k, v, mask)
    if impl != "sdpa":
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {ATTENTION_IMPLS}")
    nonempty = mask.any(-1)
    # An all-False row would softmax over nothing (NaN in some kernels): let it attend to every
    # position, then zero its output.
    safe = (mask | ~nonempty[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe)
    return out * nonempty[:, None, None, None].to(out.dtype)


def masked_attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor) -> Tensor:
    """The plain form of `masked_attention`: explicit scores, -inf fill, softmax, weighted sum."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~mask[:, None, None, :], float("-inf"))
    weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    return weights @ v


class TargetAttention(nn.Module):
    """EM3 user content interest u for a target c [B, d] or N candidates [B, N, d]."""

    def __init__(self, d: int, heads: int = 1, impl: str = "sdpa"):
        super().__init__()
        if d % heads:
            raise ValueError(f"content dim {d} is not divisible by {heads} attention heads")
        if impl not in ATTENTION_IMPLS:
            raise ValueError(f"unknown attention impl {impl!r}; expected one of {ATTENTION_IMPLS}")
        self.heads, self.impl = heads, impl
        self.query = nn.Linear(d, d)
        self.key = nn.Linear(d, d)

    def forward(self, target: Tensor, history: Tensor, mask: Tensor) -> Tensor:
        """target [B, (N,) d], history [B, L, d], mask [B, L] bool -> u [B, (N,) d]."""
        single = target.dim() == 2
        if single:
            target = target[:, None]
        q = self._heads(self.query(target))
        k = self._heads(self.key(history))
        out = masked_attention(q, k, self._heads(history), mask, self.impl)
        out = out.transpose(1, 2).flatten(-2)
        return out[:, 0] if single else out

    def _heads(self, x: Tensor) -> Tensor:
        """[B, T, d] -> [B, H, T, d / H]."""
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)
