"""Model evaluation: CTR metrics on a split's impressions and full-ranking top-K on MMRec-format data.

`evaluate_split` gives one split's block of metrics.json (docs/design.md, "Run folder and metrics"):
AUC, GAUC per user and per request, logloss, AUC on cold-start events (items absent from training),
and, for data with a top-K protocol, Recall@K / NDCG@K over all items with the user's training items
masked.

The model is anything with the RankingModel interface: `forward(batch).logits [B]`,
`score(user_id, user_feats, cand_ids, cand_c, hist_c, hist_mask) -> [B, N]` and `item_vectors(ids)`.
Evaluation runs under `torch.no_grad` in eval mode and restores the model's training mode afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from common.errors import MMRankError
from trainer.data.samples import (
    HistoryIndex,
    SampleSet,
    build_history_index,
    make_samples,
    user_feature_table,
)
from trainer.data.schema import SPLITS, Dataset
from trainer.metrics import ctr_metrics, topk_metrics
from trainer.model.config import InterestConfig

DEFAULT_KS = (10, 20)


def model_device(model: nn.Module) -> torch.device:
    param = next(model.parameters(), None)
    return param.device if param is not None else torch.device("cpu")


@contextlib.contextmanager
def inference(model: nn.Module) -> Iterator[None]:
    """Eval mode without autograd for the block; the previous train/eval mode comes back after it."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _bar(total: int, unit: str, desc: str, progress: bool | None) -> tqdm:
    # tqdm's disable=None turns the bar off when stderr is not a terminal (logs, CI).
    return tqdm(
        total=total,
        unit=unit,
        desc=desc,
        disable=None if progress is None else not progress,
        dynamic_ncols=True,
        leave=False,
    )


def predict(
    model: nn.Module, samples: SampleSet, batch_size: int = 2048, progress: bool | None = None
) -> np.ndarray:
    """Click probabilities [len(samples)] float64, in the samples' row order."""
    if batch_size < 1:
        raise MMRankError(f"batch_size must be >= 1, got {batch_size}")
    n = len(samples)
    out = np.empty(n, dtype=np.float64)
    device = model_device(model)
    with inference(model), _bar(n, "ev", "predict", progress) as bar:
        for start in range(0, n, batch_size):
            rows = np.arange(start, min(start + batch_size, n))
            logits = model(samples.batch(rows).to(device)).logits
            if logits.shape != (len(rows),):
                raise MMRankError(
                    f"model returned logits of shape {tuple(logits.shape)}, expected ({len(rows)},)"
                )
            out[rows] = torch.sigmoid(logits.float()).cpu().numpy()
            bar.update(len(rows))
    return out


def train_item_ids(ds: Dataset) -> np.ndarray:
    """Every item with at least one impression in the train split: the items training has seen."""
    return np.unique(ds.split("train")["item_id"].to_numpy())


def evaluate_ctr(
    model: nn.Module,
    samples: SampleSet,
    train_item_ids: np.ndarray,
    batch_size: int = 2048,
    progress: bool | None = None,
) -> dict:
    """auc, gauc (per user), gauc_request, logloss, cold_auc (items never in training), n, positives, cold_n."""
    probs = predict(model, samples, batch_size, progress)
    cold = ~np.isin(samples.item_id, train_item_ids)
    return ctr_metrics(samples.label, probs, samples.user_id, samples.request_id, cold)


def item_vectors(model: nn.Module, num_items: int, chunk: int = 4096) -> torch.Tensor:
    """Content vectors of ids 0..num_items ([n+1, d], row 0 = padding), computed in chunks."""
    device = model_device(model)
    ids = torch.arange(num_items + 1, device=device)
    return torch.cat([model.item_vectors(part) for part in ids.split(chunk)])


def has_content(model: nn.Module) -> bool:
    """RankingModel.tower is None for a model without content features (the ID-only baseline)."""
    return getattr(model, "tower", None) is not None


def _history_content(
    history: HistoryIndex, rows: np.ndarray, length: int, all_c: torch.Tensor | None, device: torch.device
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """Content vectors [B, L, d] (None without content) and mask [B, L] of the users' histories."""
    ids, mask = history.gather(rows, length)
    hist_c = None if all_c is None else all_c[torch.from_numpy(ids).to(device)]
    return hist_c, torch.from_numpy(mask).to(device)


class _UserRows:
    """Items per user as a CSR-like index, turned into dense boolean rows for a batch of users."""

    def __init__(self, users: np.ndarray, items: np.ndarray):
        order = np.argsort(users, kind="stable")
        self.users, self.items = users[order], items[order].astype(np.int64)

    def dense(self, batch_users: np.ndarray, n_cols: int) -> np.ndarray:
        start = np.searchsorted(self.users, batch_users, side="left")
        lengths = np.searchsorted(self.users, batch_users, side="right") - start
        rows = np.repeat(np.arange(len(batch_users)), lengths)
        offsets = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        out = np.zeros((len(batch_users), n_cols), dtype=bool)
        out[rows, self.items[np.repeat(start, lengths) + offsets]] = True
        return out


def evaluate_topk(
    model: nn.Module,
    ds: Dataset,
    split: str,
    ks: Sequence[int] = DEFAULT_KS,
    batch_users: int = 256,
    short_len: int = InterestConfig.short_len,
    long_len: int = 0,
    item_chunk: int = 2048,
    progress: bool | None = None,
) -> dict:
    """Recall@K / NDCG@K over all items for every user with held-out positives in `split`.

    The user's history is their last `short_len` (and `long_len`, for long-history models) training
    positives; every item is scored with `model.score` (content vectors computed once for all items)
    in blocks of `batch_users` x `item_chunk` candidates; the user's training positives are masked
    (sampled training negatives of the MMRec loader are not interactions and stay rankable).
    Returns {"recall@K", "ndcg@K", "topk_users"}.
    """
    if split not in SPLITS or split == "train":
        raise MMRankError(f"top-K evaluation needs a held-out split (valid or test), got {split!r}")
    n_items = ds.num_items
    train = ds.split("train")
    train_pos = train[train["label"] == 1]
    held = ds.split(split)
    held = held[held["label"] == 1]
    users = np.unique(held["user_id"].to_numpy())
    if len(users) == 0:
        raise MMRankError(f"split {split!r} has no positive events: nothing to rank")
    truth_rows = _UserRows(held["user_id"].to_numpy(), held["item_id"].to_numpy())
    seen_rows = _UserRows(train_pos["user_id"].to_numpy(), train_pos["item_id"].to_numpy())
    # History = the last short_len train positives: query every user after the last train event.
    after = np.full(len(users), int(train["ts"].to_numpy().max(initial=0)) + 1)
    history = build_history_index(
        train_pos["user_id"].to_numpy(),
        train_pos["item_id"].to_numpy(),
        train_pos["ts"].to_numpy(),
        np.ones(len(train_pos), dtype=np.int8),
        users,
        after,
    )
    feats = user_feature_table(ds)
    per_user: dict[str, list[np.ndarray]] = {}
    device = model_device(model)
    with inference(model), _bar(len(users), "user", f"top-K {split}", progress) as bar:
        all_c = item_vectors(model, n_items) if has_content(model) else None
        cand_ids = torch.arange(1, n_items + 1, device=device)
        for start in range(0, len(users), batch_users):
            rows = np.arange(start, min(start + batch_users, len(users)))
            user_t = torch.from_numpy(users[rows].astype(np.int64)).to(device)
            feats_t = torch.from_numpy(feats[users[rows]]).to(device)
            hist_c, hist_mask = _history_content(history, rows, short_len, all_c, device)
            long = {}
            if long_len > 0:
                long["long_c"], long["long_mask"] = _history_content(history, rows, long_len, all_c, device)
            scores = np.full((len(rows), n_items + 1), -np.inf)
            for ids in cand_ids.split(item_chunk):
                c = None if all_c is None else all_c[ids].expand(len(rows), -1, -1)
                logits = model.score(user_t, feats_t, ids.expand(len(rows), -1), c, hist_c, hist_mask, **long)
                scores[:, ids[0].item() : ids[-1].item() + 1] = logits.float().cpu().numpy()
            scores[seen_rows.dense(users[rows], n_items + 1)] = -np.inf
            for name, values in topk_metrics(scores, truth_rows.dense(users[rows], n_items + 1), ks).items():
                per_user.setdefault(name, []).append(values)
            bar.update(len(rows))
    out: dict = {name: float(np.nanmean(np.concatenate(parts))) for name, parts in per_user.items()}
    out["topk_users"] = int(len(users))
    return out


def evaluate_split(
    model: nn.Module,
    ds: Dataset,
    split: str,
    short_len: int = InterestConfig.short_len,
    long_len: int = 0,
    ks: Sequence[int] = DEFAULT_KS,
    batch_size: int = 2048,
    progress: bool | None = None,
) -> dict:
    """One split's block of metrics.json: the CTR metrics, plus Recall@K / NDCG@K on top-K data.

    On top-K data, histories draw on training positives only, so held-out items never leak into them.
    """
    topk = ds.manifest.topk_protocol
    history_splits = ("train",) if topk else tuple(SPLITS)
    samples = make_samples(ds, split, short_len, long_len, history_splits=history_splits)
    out = evaluate_ctr(model, samples, train_item_ids(ds), batch_size, progress)
    if topk:
        out.update(
            evaluate_topk(model, ds, split, ks, short_len=short_len, long_len=long_len, progress=progress)
        )
    return out
