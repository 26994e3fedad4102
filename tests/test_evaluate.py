"""Model evaluation against plain references, with small stand-in models that have RankingModel's interface."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from common.errors import MMRankError
from trainer.data.samples import make_samples
from trainer.data.schema import SPLITS, Dataset, Manifest
from trainer.evaluate import evaluate_ctr, evaluate_split, evaluate_topk, predict, train_item_ids
from trainer.metrics import gauc_reference, topk_reference

N_USERS, N_ITEMS, SHORT = 7, 30, 4


@dataclass
class Output:
    logits: torch.Tensor


class DotModel(nn.Module):
    """logit = <user embedding + masked mean of history content, candidate content> + user-feature bias."""

    def __init__(self, seed: int = 0, d: int = 8):
        super().__init__()
        torch.manual_seed(seed)
        self.user = nn.Embedding(N_USERS + 1, d)
        self.tower = nn.Embedding(N_ITEMS + 1, d)
        self.feat_bias = nn.Embedding(3, 1)
        self.dropout = nn.Dropout(0.5)  # must be off in eval: predictions would be random otherwise

    def item_vectors(self, ids):
        return self.tower(ids)

    def score(self, user_id, user_feats, cand_ids, cand_c, hist_c, hist_mask):
        m = hist_mask[..., None].float()
        u = self.user(user_id) + (hist_c * m).sum(1) / m.sum(1).clamp(min=1.0)
        return self.dropout((cand_c * u[:, None, :]).sum(-1)) + self.feat_bias(user_feats[:, 0])

    def forward(self, batch):
        cand = self.item_vectors(batch.item_id)[:, None]
        hist = self.item_vectors(batch.hist_ids)
        return Output(
            self.score(batch.user_id, batch.user_feats, batch.item_id[:, None], cand, hist, batch.hist_mask)[
                :, 0
            ]
        )


class IdOnlyModel(DotModel):
    """No content: score receives None content, as RankingModel's ID-only baseline does."""

    def __init__(self):
        super().__init__()
        self.tower = None
        self.item = nn.Embedding(N_ITEMS + 1, 8)

    def score(self, user_id, user_feats, cand_ids, cand_c, hist_c, hist_mask):
        assert cand_c is None and hist_c is None
        return (self.item(cand_ids) * self.user(user_id)[:, None, :]).sum(-1)

    def forward(self, batch):
        return Output(
            self.score(batch.user_id, batch.user_feats, batch.item_id[:, None], None, None, batch.hist_mask)[
                :, 0
            ]
        )


def make_dataset(seed: int = 0, topk: bool = False, n_events: int = 400) -> Dataset:
    """Events over time; items 26..30 are created late and only appear in valid/test (cold start)."""
    rng = np.random.default_rng(seed)
    ts = np.sort(rng.integers(0, 1000, n_events))
    item = rng.integers(1, 26, n_events)
    cold_rows = np.flatnonzero(ts >= 700)[::3]
    item[cold_rows] = rng.integers(26, N_ITEMS + 1, len(cold_rows))
    events = pd.DataFrame(
        {
            "user_id": rng.integers(1, N_USERS + 1, n_events),
            "item_id": item,
            "label": rng.integers(0, 2, n_events).astype(np.int8),
            "ts": ts,
            "request_id": ts // 10,
            "split": np.select(
                [ts < 700, ts < 850], [SPLITS["train"], SPLITS["valid"]], SPLITS["test"]
            ).astype(np.int8),
        }
    )
    manifest = Manifest(
        name="tiny",
        source="test",
        seed=seed,
        label_rule="random",
        counts={"items": N_ITEMS, "users": N_USERS},
        splits={"valid_start_ts": 700, "test_start_ts": 850},
        text_fields=[],
        item_categoricals={},
        user_features={"group": 3},
        has_images=False,
        topk_protocol=topk,
    )
    items = pd.DataFrame(
        {"item_id": np.arange(1, N_ITEMS + 1), "created_at": np.zeros(N_ITEMS, dtype=np.int64)}
    )
    users = pd.DataFrame({"user_id": np.arange(1, N_USERS + 1), "group": np.arange(N_USERS) % 3})
    return Dataset(Path("tiny"), manifest, items, users, events)


def test_predict_is_batch_invariant_in_eval_mode_and_restores_training():
    ds = make_dataset()
    samples = make_samples(ds, "valid", SHORT)
    model = DotModel()
    model.train()
    a = predict(model, samples, batch_size=7, progress=False)
    b = predict(model, samples, batch_size=1000, progress=False)
    assert model.training
    model.eval()
    with torch.no_grad():
        expected = torch.sigmoid(model(samples.batch(np.arange(len(samples)))).logits).numpy()
    np.testing.assert_allclose(a, expected, rtol=1e-6)
    np.testing.assert_allclose(b, expected, rtol=1e-6)
    assert a.shape == (len(samples),) and ((a > 0) & (a < 1)).all()


def test_evaluate_ctr_matches_references():
    ds = make_dataset(seed=1)
    samples = make_samples(ds, "test", SHORT)
    model = DotModel(seed=2)
    train_items = train_item_ids(ds)
    out = evaluate_ctr(model, samples, train_items, batch_size=16, progress=False)
    probs = predict(model, samples, progress=False)
    labels = samples.label
    cold = np.array([i not in set(train_items.tolist()) for i in samples.item_id])
    assert cold.any() and not cold.all()
    assert out["auc"] == pytest.approx(roc_auc_score(labels, probs), abs=1e-12)
    assert out["gauc"] == pytest.approx(gauc_reference(labels, probs, samples.user_id), abs=1e-12)
    assert out["gauc_request"] == pytest.approx(gauc_reference(labels, probs, samples.request_id), abs=1e-12)
    assert out["cold_auc"] == pytest.approx(roc_auc_score(labels[cold], probs[cold]), abs=1e-12)
    assert (out["n"], out["positives"], out["cold_n"]) == (len(labels), int(labels.sum()), int(cold.sum()))


def topk_reference_eval(model, ds, split, k, short_len):
    """One user at a time: history from a pandas sort, every item scored, train positives masked."""
    train = ds.split("train")
    train_pos = train[train["label"] == 1].sort_values(["user_id", "ts"], kind="stable")
    held = ds.split(split)
    held = held[held["label"] == 1]
    all_c = model.item_vectors(torch.arange(N_ITEMS + 1))
    group = ds.users.set_index("user_id")["group"]
    rows, truths = [], []
    for user in sorted(held["user_id"].unique()):
        hist = train_pos[train_pos["user_id"] == user]["item_id"].to_numpy()[-short_len:]
        hist_ids = torch.tensor(np.concatenate([np.zeros(short_len - len(hist), dtype=np.int64), hist]))[None]
        cands = torch.arange(1, N_ITEMS + 1)[None]
        logits = model.score(
            torch.tensor([user]),
            torch.tensor([[group[user]]]),
            cands,
            all_c[cands],
            all_c[hist_ids],
            hist_ids != 0,
        )[0].numpy()
        scores = np.concatenate([[-np.inf], logits])
        scores[train_pos[train_pos["user_id"] == user]["item_id"].to_numpy()] = -np.inf
        truth = np.zeros(N_ITEMS + 1, dtype=bool)
        truth[held[held["user_id"] == user]["item_id"].to_numpy()] = True
        rows.append(scores)
        truths.append(truth)
    return topk_reference(np.array(rows), np.array(truths), k)


def test_evaluate_topk_matches_per_user_reference():
    ds = make_dataset(seed=3, topk=True)
    model = DotModel(seed=4).eval()
    out = evaluate_topk(
        model, ds, "test", ks=(5, 10), batch_users=3, short_len=SHORT, item_chunk=7, progress=False
    )
    for k in (5, 10):
        with torch.no_grad():
            recall, ndcg = topk_reference_eval(model, ds, "test", k, SHORT)
        assert out[f"recall@{k}"] == pytest.approx(recall, abs=1e-9)
        assert out[f"ndcg@{k}"] == pytest.approx(ndcg, abs=1e-9)
    held = ds.split("test")
    assert out["topk_users"] == held[held["label"] == 1]["user_id"].nunique()


class OracleModel(DotModel):
    """Scores the user's held-out items 1 and everything else 0, except train items at 5 (which the
    evaluation must mask)."""

    def __init__(self, held: np.ndarray, seen: np.ndarray):
        super().__init__()
        self.register_buffer("table", torch.from_numpy(held.astype(np.float32) + 5 * seen))

    def score(self, user_id, user_feats, cand_ids, cand_c, hist_c, hist_mask):
        return torch.gather(self.table[user_id], 1, cand_ids)


def test_evaluate_topk_oracle_is_perfect_once_train_items_are_masked():
    ds = make_dataset(seed=5, topk=True)
    held = np.zeros((N_USERS + 1, N_ITEMS + 1), dtype=bool)
    seen = np.zeros_like(held)
    test = ds.split("test")
    train = ds.split("train")
    test, train = test[test["label"] == 1], train[train["label"] == 1]
    held[test["user_id"], test["item_id"]] = True
    seen[train["user_id"], train["item_id"]] = True
    held &= ~seen  # an item seen in training is masked, so it can never be recovered
    ds.events = ds.events[
        ~((ds.events["split"] == SPLITS["test"]) & seen[ds.events["user_id"], ds.events["item_id"]])
    ]
    assert 0 < held.sum(1).max() <= 10 < seen.sum(1).max()  # unmasked, seen items would fill the top 10
    out = evaluate_topk(OracleModel(held, seen), ds, "test", ks=(10,), short_len=SHORT, progress=False)
    assert out["recall@10"] == pytest.approx(1.0)
    assert out["ndcg@10"] == pytest.approx(1.0)


def test_evaluate_split_on_topk_data_has_spec_keys_and_id_only_models_work():
    ds = make_dataset(seed=6, topk=True)
    for model in (DotModel(seed=7), IdOnlyModel()):
        out = evaluate_split(model, ds, "valid", short_len=SHORT, ks=(10, 20), progress=False)
        for key in (
            "auc",
            "gauc",
            "gauc_request",
            "logloss",
            "cold_auc",
            "recall@20",
            "ndcg@20",
            "recall@10",
        ):
            assert key in out
        assert 0.0 <= out["recall@20"] <= 1.0 and 0.0 <= out["ndcg@20"] <= 1.0
    assert "recall@20" not in evaluate_split(
        DotModel(), make_dataset(seed=6), "valid", short_len=SHORT, progress=False
    )


def test_bad_requests_are_named():
    ds = make_dataset(topk=True)
    with pytest.raises(MMRankError, match="held-out split"):
        evaluate_topk(DotModel(), ds, "train", progress=False)

    class WrongShape(DotModel):
        def forward(self, batch):
            return Output(super().forward(batch).logits[:, None])

    with pytest.raises(MMRankError, match="logits of shape"):
        predict(WrongShape(), make_samples(ds, "valid", SHORT), progress=False)
