"""Ranking requests drawn from a dataset's test split, sized for load tests: N candidates, L history ids.

A request is one test request group of the dataset (`trainer.data.requests`): the user, the last L
positive items strictly before it (real history) and the items the request showed. Only requests whose
user has at least L earlier positives are kept, so every request carries exactly L history ids. The
candidate set is the request's own items first, then items drawn uniformly (seeded, without
repetition) from the whole catalogue up to N, as a retrieval stage would hand N candidates to the
ranker; a request with more than N items keeps its first N.

Saved as one `.npz` (numpy only) so the locust process, which runs under gevent, needs neither torch
nor pandas.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.errors import MMRankError


@dataclass(frozen=True)
class SampleConfig:
    candidates: int = 100  # N, candidates per request
    history: int = 50  # L, history ids per request (only users with at least L earlier positives)
    requests: int = 1000  # distinct requests drawn (callers cycle through them)
    seed: int = 0  # which requests and which filler candidates


@dataclass
class RequestSample:
    users: np.ndarray  # [R] user ids
    histories: np.ndarray  # [R, L] item ids, oldest first
    candidates: np.ndarray  # [R, N] item ids

    def __len__(self) -> int:
        return len(self.users)

    def save(self, path: str | Path) -> Path:
        np.savez(path, users=self.users, histories=self.histories, candidates=self.candidates)
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> RequestSample:
        path = Path(path)
        if not path.is_file():
            raise MMRankError(f"{path}: requests file not found")
        with np.load(path) as f:
            return cls(f["users"], f["histories"], f["candidates"])


def _fill(own: np.ndarray, n: int, num_items: int, rng: np.random.Generator) -> np.ndarray:
    own = own[:n]
    pool = np.setdiff1d(np.arange(1, num_items + 1), own)
    if len(own) + len(pool) < n:
        raise MMRankError(f"the catalogue holds {num_items} items, fewer than {n} candidates")
    return np.concatenate([own, rng.choice(pool, n - len(own), replace=False)]).astype(np.int64)


def draw_requests(data: str | Path, cfg: SampleConfig = SampleConfig()) -> RequestSample:
    from trainer.data.requests import request_groups
    from trainer.data.schema import MANIFEST, Manifest

    data = Path(data)
    if not (data / MANIFEST).is_file():
        raise MMRankError(f"{data}: not a dataset folder (no {MANIFEST}; make one with `mmrank data ...`)")
    num_items = Manifest.read(data).counts["items"]
    # Every test request group, in a seeded random order; the first `requests` with a full history win.
    groups = request_groups(data, cfg.history, count=sys.maxsize, seed=cfg.seed)
    full = [i for i, h in enumerate(groups.histories) if len(h) == cfg.history][: cfg.requests]
    if not full:
        raise MMRankError(f"{data}: no test request has a history of {cfg.history} items (lower --history)")
    rng = np.random.default_rng(cfg.seed)
    return RequestSample(
        users=np.array([groups.users[i] for i in full], dtype=np.int64),
        histories=np.stack([groups.histories[i] for i in full]).astype(np.int64),
        candidates=np.stack([_fill(groups.candidates[i], cfg.candidates, num_items, rng) for i in full]),
    )


def random_requests(num_items: int, num_users: int, cfg: SampleConfig = SampleConfig()) -> RequestSample:
    """Requests of uniformly drawn ids (seeded) for shapes no dataset here has, e.g. L = 1,000 histories
    for GPU latency (ML-100K users have at most 737 ratings): latency depends on shapes, not on which
    items are asked for."""
    rng = np.random.default_rng(cfg.seed)
    r = cfg.requests
    return RequestSample(
        users=rng.integers(1, num_users + 1, r).astype(np.int64),
        histories=rng.integers(1, num_items + 1, (r, cfg.history)).astype(np.int64),
        candidates=np.stack([rng.choice(num_items, cfg.candidates, replace=False) + 1 for _ in range(r)]),
    )
