"""A dataset's test split as ranking requests: what a client sends the served model, and what it was shown.

A request is one request group of the test split (the impressions sharing a `request_id`): its user, the
user's positive items strictly before it (the causal history the trainer builds, at most `history_len`,
oldest first) and the items the request showed, with their labels. The demo ranks these requests through
the server and compares the scores with the trained model's; the load test's request sample
(`clients/request_sample.py`) draws its requests from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass
class Requests:
    """Test requests as the client sends them: one history and the request's candidates each."""

    users: list[int]
    histories: list[np.ndarray]
    candidates: list[np.ndarray]
    labels: list[np.ndarray]


def request_groups(data: str | Path, history_len: int, count: int, seed: int) -> Requests:
    """`count` request groups of the test split of the dataset `data`, in a seeded random order."""
    from trainer.data.samples import make_samples
    from trainer.data.schema import load_dataset

    samples = make_samples(load_dataset(data, validate=False), "test", history_len)
    _, first = np.unique(samples.request_id, return_index=True)
    picked = np.random.default_rng(seed).permutation(first)[:count]
    hist, mask = samples.history.gather(picked, history_len)
    out = Requests([], [], [], [])
    for row, h, m in zip(picked, hist, mask, strict=True):
        rows = np.flatnonzero(samples.request_id == samples.request_id[row])
        out.users.append(int(samples.user_id[row]))
        out.histories.append(h[m])
        out.candidates.append(samples.item_id[rows].astype(np.int64))
        out.labels.append(samples.label[rows].astype(np.float32))
    return out
