"""Training losses: L = BCE + alpha * L_CIC + lambda * L_SQDC (docs/design.md, "Losses"). Pure
functions of tensors.

- BPR (`model.loss.main = "bpr"`, the `bpr` preset): the pairwise loss of BPR-MF, replacing BCE, for
  top-K data where a positive should outrank items the user never interacted with.

- CIC (EM3 eq. 10-14): C_i = f_cic(c_i) and I_i = f'_cic(id_i) come in already projected; both are
  L2-normalised, logits = cos / tau against every other distinct item of the batch (EM3 samples H
  negatives from the batch; we take all of them), L_CIC = 0.5 (L_C2I + L_I2C). An item repeated in the
  batch would be its own negative, so only its first occurrence takes part.
- SQDC (LEMUR): for clicked samples i, InfoNCE of T * cos(q_i, d_j) over all in-batch samples j, where
  A_ij = 0 if i != j and request_i == request_j removes the other impressions of the same request from
  the denominator (the positive itself stays). Averaged over clicked samples (the paper sums; the mean
  keeps lambda independent of the batch size); a batch without clicks gives 0 with the graph intact.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def bce(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean binary cross-entropy of click logits [B] against 0/1 labels [B]."""
    return F.binary_cross_entropy_with_logits(logits, labels.to(logits.dtype))


def bpr(pos_logits: Tensor, neg_logits: Tensor) -> Tensor:
    """Mean BPR loss -log sigmoid(s_pos - s_neg) of paired positive and sampled negative scores [B]."""
    return -F.logsigmoid(pos_logits - neg_logits).mean()


def first_occurrence(ids: Tensor) -> Tensor:
    """Indices [U] of the first occurrence of each distinct value of ids [B], in batch order."""
    unique, inverse = torch.unique(ids, return_inverse=True)
    positions = torch.arange(ids.numel(), device=ids.device)
    first = torch.full_like(unique, ids.numel()).scatter_reduce(0, inverse, positions, reduce="amin")
    return first.sort().values


def cic_loss(content: Tensor, ids: Tensor, item_ids: Tensor, tau: float) -> Tensor:
    """EM3 Content-ID-Contrastive loss 0.5 (C2I + I2C) of content [B, k] = f_cic(c) and ids [B, k] =
    f'_cic(id) for the batch's items item_ids [B]; repeated items count once."""
    keep = first_occurrence(item_ids)
    c = F.normalize(content[keep], dim=-1)
    i = F.normalize(ids[keep], dim=-1)
    logits = c @ i.T / tau
    target = torch.arange(keep.numel(), device=logits.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target))


def sqdc_loss(
    query: Tensor,
    doc: Tensor,
    labels: Tensor,
    request_ids: Tensor,
    scale: float = 50.0,
    request_mask: bool = True,
) -> Tensor:
    """LEMUR Session-masked Query-to-Document Contrastive loss of query [B, k] and doc [B, k] vectors."""
    logits = scale * F.normalize(query, dim=-1) @ F.normalize(doc, dim=-1).T
    target = torch.arange(logits.shape[0], device=logits.device)
    if request_mask:
        same = request_ids[:, None] == request_ids[None, :]
        same &= target[:, None] != target[None, :]
        logits = logits.masked_fill(same, float("-inf"))
    anchors = (labels > 0.5).to(logits.dtype)
    per_sample = F.cross_entropy(logits, target, reduction="none")
    return (per_sample * anchors).sum() / anchors.sum().clamp(min=1.0)
