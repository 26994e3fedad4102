"""BPR's negative sampler: uniform over the items with train positives that the user has none for,
seeded by torch."""

import numpy as np
import pytest
import torch

from common.errors import MMRankError
from trainer.data.negatives import NegativeSampler


def test_negatives_avoid_the_users_positives_and_items_without_train_positives():
    users = np.array([1, 1, 1, 2, 3])
    items = np.array([1, 2, 3, 5, 6])
    # User 1 hits a positive on 3 of 5 draws; at 60 redraws the chance of keeping one is 3000 * 0.6**61.
    sampler = NegativeSampler(users, items, num_items=8, tries=60)
    torch.manual_seed(0)
    neg = sampler.sample(torch.tensor([1] * 3000 + [2] * 3000))
    assert set(neg[:3000].tolist()) == {5, 6}  # 4, 7 and 8 have no train positive: never drawn
    assert set(neg[3000:].tolist()) == {1, 2, 3, 6}
    counts = np.bincount(neg[:3000].numpy(), minlength=9)[[5, 6]]
    assert counts.min() > 1350  # about uniform: 1500 each


def test_same_seed_same_negatives_and_tiny_catalogues_fail():
    sampler = NegativeSampler(np.array([1, 2, 3]), np.array([1, 7, 9]), num_items=50)
    draws = []
    for _ in range(2):
        torch.manual_seed(3)
        draws.append(sampler.sample(torch.ones(20, dtype=torch.int64)))
    assert torch.equal(*draws)
    with pytest.raises(MMRankError, match="at least 2 items with train positives"):
        NegativeSampler(np.array([1, 2]), np.array([4, 4]), num_items=50)
