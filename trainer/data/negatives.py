"""Sampled negatives for pairwise (BPR) training, as MMRec's BPR sampler draws them.

For each (user, positive item) of a batch, one item drawn uniformly from 1..num_items among those the
user has no positive for in the train split. Draws come from torch's global RNG, whose state the
checkpoints carry, so a resumed run draws the same negatives. A draw that hits a positive is redrawn
up to `tries` times; after that it is kept (only a user with nearly every item as a positive gets there).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from common.errors import MMRankError


class NegativeSampler:
    def __init__(self, users: np.ndarray, items: np.ndarray, num_items: int, tries: int = 10):
        if num_items < 2:
            raise MMRankError(f"negative sampling needs at least 2 items, the data has {num_items}")
        self.num_items, self.tries = num_items, tries
        keys = users.astype(np.int64) * (num_items + 1) + items.astype(np.int64)
        self.keys = torch.from_numpy(np.unique(keys))  # sorted (user, item) pairs the user liked

    def _positive(self, users: Tensor, items: Tensor) -> Tensor:
        return torch.isin(users * (self.num_items + 1) + items, self.keys.to(users.device))

    def sample(self, users: Tensor) -> Tensor:
        """One negative item id per user id in users [B] -> [B] int64."""
        neg = torch.randint(1, self.num_items + 1, users.shape, device=users.device)
        for _ in range(self.tries):
            hit = self._positive(users, neg)
            if not bool(hit.any()):
                break
            neg[hit] = torch.randint(1, self.num_items + 1, (int(hit.sum()),), device=users.device)
        return neg
