"""LEMUR memory bank: the latest content vector of every item, keyed by item id (SPEC §2.2).

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
- Staleness is mean cos(fresh, cached) over the ids of a write that were present before it, NaN when
  none was; coverage is the share of (masked) ids present. All three buffers are part of state_dict,
  so checkpoints carry the bank.
"""

from __future__ import annotations

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


class MemoryBank(nn.Module):
    """A [num_items + 1, d] table of content vectors with last-written step and present flag."""

    def __init__(self, num_items: int, d: int):
        super().__init__()
        self.num_items, self.d = num_items, d
        self.register_buffer("vectors", torch.zeros(num_items + 1, d))
        self.register_buffer("written_step", torch.full((num_items + 1,), -1, dtype=torch.int64))
        self.register_buffer("present", torch.zeros(num_items + 1, dtype=torch.bool))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "default", None)  # the learned default of older checkpoints, now unused
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def write(self, ids: Tensor, vecs: Tensor, step: int) -> Tensor:
        """Store detached vectors for ids [M] (duplicates averaged, id 0 ignored); returns staleness."""
        keep = ids != PAD_ID
        unique, mean = dedup_mean(ids[keep], vecs[keep].detach().to(self.vectors.dtype))
        was_present = self.present[unique]
        cos = F.cosine_similarity(mean[was_present], self.vectors[unique[was_present]], dim=-1)
        self.vectors[unique] = mean
        self.written_step[unique] = step
        self.present[unique] = True
        return cos.mean() if cos.numel() else cos.new_tensor(float("nan"))

    def all_gather_write(self, ids: Tensor, vecs: Tensor, step: int) -> Tensor:
        """`write` the union of every rank's (ids, vecs), so all ranks hold the same bank afterwards.

        Ragged sizes are padded with id 0, which `write` ignores. Works with gloo (CPU) and NCCL;
        without an initialised process group (or with one rank) it is a local write.
        """
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
            return self.write(ids, vecs, step)
        ids, vecs = ids.reshape(-1), vecs.detach().reshape(-1, self.d).to(self.vectors.dtype)
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
        return self.write(torch.cat(all_ids), torch.cat(all_vecs), step)

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
