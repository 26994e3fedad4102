"""Training batches from a split's samples: row order in, Batches out, optionally built in DataLoader
worker processes (batches are pure functions of their rows, so workers change nothing but speed)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import numpy as np
import torch

from trainer.data.batch import Batch
from trainer.data.samples import HistoryIndex, SampleSet


def take(samples: SampleSet, rows: np.ndarray) -> SampleSet:
    """The samples of `rows`, in that order (a stream window)."""
    h = samples.history
    return dataclasses.replace(
        samples,
        user_id=samples.user_id[rows],
        item_id=samples.item_id[rows],
        label=samples.label[rows],
        request_id=samples.request_id[rows],
        ts=samples.ts[rows],
        history=HistoryIndex(h.pos_item, h.start[rows], h.end[rows]),
    )


class _RowBatches(torch.utils.data.Dataset):
    """Batch i = rows[i * size : (i + 1) * size], for DataLoader workers."""

    def __init__(self, samples: SampleSet, rows: np.ndarray, size: int):
        self.samples, self.rows, self.size = samples, rows, size

    def __len__(self) -> int:
        return math.ceil(len(self.rows) / self.size)

    def __getitem__(self, i: int) -> Batch:
        return self.samples.batch(self.rows[i * self.size : (i + 1) * self.size])


def batches(
    samples: SampleSet, rows: np.ndarray, size: int, start: int, workers: int, pin: bool
) -> Iterator[Batch]:
    """Batches of `rows` from batch index `start` on; built in worker processes when workers > 0."""
    rows = rows[start * size :]
    source = _RowBatches(samples, rows, size)
    if workers == 0:
        yield from (source[i] for i in range(len(source)))
        return
    # Batches are pure functions of rows; the loader's own generator keeps its worker seeding from
    # drawing on the global RNG, which must advance exactly as without workers (dropout, sampling).
    yield from torch.utils.data.DataLoader(
        source, batch_size=None, num_workers=workers, pin_memory=pin, generator=torch.Generator()
    )
