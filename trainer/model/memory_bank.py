"""LEMUR memory bank: the latest content vector of every item, keyed by item id (docs/design.md,
"Memory bank").

Each training step writes the vectors just computed for the batch's target items (detached) and the
history sequences read theirs from the bank, so no encoder runs on history items. A history item that
was also encoded in this step takes its fresh vector, gradient included ("dedup join").

Decisions:
- Duplicate ids within one write are averaged (index_put_ with repeated indices would keep an
  unspecified copy), and it averages out dropout noise between copies of the same item. The mean sums
  each id's rows in their order by `torch.segment_reduce`, a loop per output element on CPU and CUDA
  alike, so it is bitwise reproducible and DDP replicas, which all average the same gathered rows,
  hold bitwise the same bank. (`index_add` would use atomic adds on CUDA, whose order varies.)
- Reading an id that was never written returns zeros, as for id 0 (padding); the model fills those
  positions with the tower's encoding (`RankingModel.item_vectors`) in training, evaluation and the
  exported table alike. (A learned default read in training only would score an item differently in
  training than in serving, where the table holds its encoding.)
- Coverage is the share of (masked) ids present. The three buffers are part of state_dict, so
  checkpoints carry the bank.
- Staleness (LEMUR: cos(current output, cached vector) at each overwrite) is measured by the
  `StalenessProbe`, not on the bank's own vectors: those come from the training-mode forward, dropout
  included, so cos(fresh, cached) stays well below 1 when no weight has moved (0.95 with the default
  fusion dropout 0.1 in tests/model/test_ranking_model.py): it would measure dropout noise rather
  than encoder drift.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.data.schema import PAD_ID


def dedup_mean(ids: Tensor, vecs: Tensor) -> tuple[Tensor, Tensor]:
    """Sorted unique ids [U] and the mean of their vectors [U, d]; differentiable in `vecs` and
    bitwise reproducible on every device (each id's rows are summed in their order, no atomics)."""
    unique, counts = torch.unique(ids, sorted=True, return_counts=True)
    order = torch.argsort(ids, stable=True)
    # counts come from the same ids, so they sum to the row count: the check would only add a sync.
    return unique, torch.segment_reduce(vecs[order], "mean", lengths=counts, unsafe=True)


def dedup_join(hist_ids: Tensor, bank_vecs: Tensor, fresh_ids: Tensor, fresh_vecs: Tensor) -> Tensor:
    """Replace bank values [B, L, d] by fresh ones wherever a history id was encoded in this step.

    fresh_ids [M] may repeat (their vectors are averaged, as in `MemoryBank.write`); the result keeps
    the gradient of `fresh_vecs` at the replaced positions and of `bank_vecs` elsewhere.
    A binary search per history position: O(B L log M).
    """
    keep = fresh_ids != PAD_ID
    unique, mean = dedup_mean(fresh_ids[keep], fresh_vecs[keep])
    if unique.numel() == 0:
        return bank_vecs
    pos = torch.searchsorted(unique, hist_ids).clamp(max=unique.numel() - 1)
    hit = (unique[pos] == hist_ids) & (hist_ids != PAD_ID)
    return torch.where(hit[..., None], mean[pos], bank_vecs)


def dedup_join_reference(
    hist_ids: Tensor, bank_vecs: Tensor, fresh_ids: Tensor, fresh_vecs: Tensor
) -> Tensor:
    """The plain form of `dedup_join`: a [B, L, M] equality matrix averaging the matching fresh rows."""
    match = (hist_ids[..., None] == fresh_ids) & (fresh_ids != PAD_ID)
    hits = match.sum(-1, keepdim=True)
    fresh = (match.to(fresh_vecs.dtype) @ fresh_vecs) / hits.clamp(min=1)
    return torch.where(hits > 0, fresh, bank_vecs)


def all_gather_rows(ids: Tensor, vecs: Tensor) -> tuple[Tensor, Tensor]:
    """Every rank's (ids [M_r], detached vecs [M_r, d]) concatenated in rank order, ragged sizes padded
    with id 0 (which every write ignores). Works with gloo (CPU) and NCCL; without an initialised
    process group (or with one rank) it returns the input."""
    ids, vecs = ids.reshape(-1), vecs.detach().reshape(-1, vecs.shape[-1])
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return ids, vecs
    world = dist.get_world_size()
    size = torch.tensor([ids.numel()], device=ids.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    pad = int(max(s.item() for s in sizes)) - ids.numel()
    ids = F.pad(ids, (0, pad), value=PAD_ID)
    vecs = F.pad(vecs, (0, 0, 0, pad))
    all_ids = [torch.empty_like(ids) for _ in range(world)]
    all_vecs = [torch.empty_like(vecs) for _ in range(world)]
    dist.all_gather(all_ids, ids)
    dist.all_gather(all_vecs, vecs)
    return torch.cat(all_ids), torch.cat(all_vecs)


# The staleness probe follows every PROBE_STRIDE-th item id, or a sparser share so that it keeps at most
# PROBE_ITEMS references: its eval-mode encodings then cost at most 1 / PROBE_STRIDE of a no-grad pass
# over each step's freshly encoded items, and its memory stays small for any catalogue.
PROBE_STRIDE = 8
PROBE_ITEMS = 4096


class StalenessProbe(nn.Module):
    """LEMUR's staleness without dropout noise, measured on every `stride`-th item id.

    Whenever the bank writes a probed item, the model hands the probe that item's eval-mode vector
    (`RankingModel._probe`). The probe compares it with the one it kept from the item's previous write
    and keeps the new one, so cos(eval-mode vector now, reference) is how far the encoder moved since
    the cached vector was written: 1 up to rounding when no weight changed. (ML-100K's 1682 items:
    stride 8, 210 items followed.) The buffers stay out of state_dict (a statistic, not model state): a
    resumed run reports staleness again from the second write of a probed item on.
    """

    def __init__(self, num_items: int, d: int):
        super().__init__()
        self.stride = max(PROBE_STRIDE, math.ceil(num_items / PROBE_ITEMS))
        rows = num_items // self.stride + 1
        self.register_buffer("vectors", torch.zeros(rows, d), persistent=False)
        self.register_buffer("present", torch.zeros(rows, dtype=torch.bool), persistent=False)

    def probed(self, ids: Tensor) -> Tensor:
        """Mask [...] of the ids [...] the probe keeps a reference for (never id 0)."""
        return (ids % self.stride == 0) & (ids != PAD_ID)

    @torch.no_grad()
    def update(self, ids: Tensor, vecs: Tensor) -> Tensor:
        """Mean cos between eval-mode vectors [M, d] and the references of their ids [M] (duplicates
        averaged, ids not probed ignored), NaN where no id had one; the vectors become the references."""
        keep = self.probed(ids)
        unique, mean = dedup_mean(ids[keep], vecs[keep].to(self.vectors.dtype))
        rows = unique // self.stride
        had = self.present[rows]
        cos = F.cosine_similarity(mean[had], self.vectors[rows[had]], dim=-1)
        self.vectors[rows] = mean
        self.present[rows] = True
        return cos.mean() if cos.numel() else cos.new_tensor(float("nan"))

    def all_gather_update(self, ids: Tensor, vecs: Tensor) -> Tensor:
        """`update` with the union of every rank's (ids, vecs), so every rank reports the same value."""
        return self.update(*all_gather_rows(ids, vecs.to(self.vectors.dtype)))


class MemoryBank(nn.Module):
    """A [num_items + 1, d] table of content vectors with last-written step and present flag."""

    def __init__(self, num_items: int, d: int):
        super().__init__()
        self.register_buffer("vectors", torch.zeros(num_items + 1, d))
        self.register_buffer("written_step", torch.full((num_items + 1,), -1, dtype=torch.int64))
        self.register_buffer("present", torch.zeros(num_items + 1, dtype=torch.bool))
        self.probe = StalenessProbe(num_items, d)

    @torch.no_grad()
    def write(self, ids: Tensor, vecs: Tensor, step: int) -> None:
        """Store detached vectors for ids [M] (duplicates averaged, id 0 ignored)."""
        keep = ids != PAD_ID
        unique, mean = dedup_mean(ids[keep], vecs[keep].detach().to(self.vectors.dtype))
        self.vectors[unique] = mean
        self.written_step[unique] = step
        self.present[unique] = True

    def all_gather_write(self, ids: Tensor, vecs: Tensor, step: int) -> None:
        """`write` the union of every rank's (ids, vecs), so all ranks hold the same bank afterwards."""
        self.write(*all_gather_rows(ids, vecs.to(self.vectors.dtype)), step)

    def read(self, ids: Tensor) -> Tensor:
        """Vectors [..., d] for ids [...]: the bank value (a constant), zeros where never written (and
        for padding, row 0 being never written)."""
        return self.vectors[ids]

    def coverage(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """Share of the (masked) ids that are present in the bank; NaN for no ids."""
        present = self.present[ids]
        if mask is not None:
            present = present[mask]
        return (
            present.float().mean() if present.numel() else present.new_tensor(float("nan"), dtype=torch.float)
        )
