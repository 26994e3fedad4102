"""BPR's negative sampler: uniform over the items a user has no train positive for, seeded by torch."""

import numpy as np
import pytest
import torch

from common.errors import MMRankError
from trainer.data.negatives import NegativeSampler


def test_negatives_avoid_the_users_positives_and_cover_the_rest():
    users = np.array([1, 1, 1, 2])
    items = np.array([1, 2, 3, 5])
    # User 1 hits a positive on half the draws; at the default 10 redraws about 1.5 of its 3000 draws
    # keep a positive. At 60 the expected number is 3000 / 2**61.
    sampler = NegativeSampler(users, items, num_items=6, tries=60)
    torch.manual_seed(0)
    neg = sampler.sample(torch.tensor([1] * 3000 + [2] * 3000))
    assert set(neg[:3000].tolist()) == {4, 5, 6}
    assert set(neg[3000:].tolist()) == {1, 2, 3, 4, 6}
    counts = np.bincount(neg[:3000].numpy(), minlength=7)[4:]
    assert counts.min() > 850  # about uniform: 1000 each


def test_same_seed_same_negatives_and_tiny_catalogues_fail():
    sampler = NegativeSampler(np.array([1]), np.array([1]), num_items=50)
    draws = []
    for _ in range(2):
        torch.manual_seed(3)
        draws.append(sampler.sample(torch.ones(20, dtype=torch.int64)))
    assert torch.equal(*draws)
    with pytest.raises(MMRankError, match="at least 2 items"):
        NegativeSampler(np.array([1]), np.array([1]), num_items=1)
