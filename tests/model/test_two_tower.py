"""The two-tower graph models against dense references on a tiny graph: LightGCN's layer mean, FREEDOM's
item-item term and pruned training graph, EM3 on FREEDOM's multimodal tower; one score path for
forward, score, full_scores and the eval-mode cache."""

import numpy as np
import pytest
import torch

from common.errors import MMRankError
from trainer.data.batch import Batch
from trainer.losses import bpr
from trainer.model.build import build_model
from trainer.model.config import ContentConfig, GraphConfig, LossConfig, ModelConfig
from trainer.model.graph import knn_graph_reference, normalized_adjacency_reference
from trainer.model.ranking_model import ModelSchema

NUM_USERS, NUM_ITEMS = 5, 8


def _schema(modalities=("text_feat", "image_feat")) -> ModelSchema:
    gen = torch.Generator().manual_seed(0)
    feats = {}
    for name, dim in (("text_feat", 6), ("image_feat", 5)):
        if name in modalities:
            x = torch.randn(NUM_ITEMS + 1, 1, dim, generator=gen)
            x[0] = 0
            feats[name] = (x, x.abs().sum(-1) > 0)
    rng = np.random.default_rng(0)
    users = np.repeat(np.arange(1, NUM_USERS + 1), 3)
    items = np.concatenate([rng.choice(np.arange(1, NUM_ITEMS), 3, replace=False) for _ in range(NUM_USERS)])
    return ModelSchema(
        num_items=NUM_ITEMS,
        num_users=NUM_USERS,
        item_cats=torch.zeros(NUM_ITEMS + 1, 0, dtype=torch.int64),
        item_cat_cards=(),
        user_feat_cards=(),
        modalities=feats,
        train_edges=(users, items),  # item 8 has no training interaction
    )


def _cfg(model: str, **graph) -> ModelConfig:
    return ModelConfig(
        content=ContentConfig(d=8, num_queries=2, fusion_heads=2, dropout=0.0),
        loss=LossConfig(main="bpr", cic_alpha=0.001, cic_dim=8, cic_negatives=4),
        graph=GraphConfig(model=model, dim=4, knn_k=3, **graph),
    )


def _dense_adjacency(schema: ModelSchema) -> np.ndarray:
    users, items = schema.train_edges
    return normalized_adjacency_reference(users - 1, items - 1, NUM_USERS, NUM_ITEMS)


def _layer_mean(adj: np.ndarray, ego: np.ndarray, layers: int) -> np.ndarray:
    out, x = [ego], ego
    for _ in range(layers):
        x = adj @ x
        out.append(x)
    return np.mean(out, 0)


def _item_graph(schema: ModelSchema) -> np.ndarray:
    text = knn_graph_reference(schema.modalities["text_feat"][0][1:, 0].numpy(), np.ones(NUM_ITEMS, bool), 3)
    image = knn_graph_reference(
        schema.modalities["image_feat"][0][1:, 0].numpy(), np.ones(NUM_ITEMS, bool), 3
    )
    return 0.1 * image + 0.9 * text


def _ego(model) -> np.ndarray:
    return torch.cat([model.user_emb.weight, model.item_emb.weight]).detach().double().numpy()


def _tables(model) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    users, items = model.tables()
    assert not users[0].any() and not items[0].any()  # padding rows
    return users[1:].double().numpy(), items[1:].double().numpy()


@pytest.mark.parametrize("layers", [0, 1, 3])
def test_lightgcn_is_the_mean_of_its_propagated_layers(layers):
    schema = _schema(())
    torch.manual_seed(0)
    model = build_model(_cfg("lightgcn", ui_layers=layers), schema)
    users, items = _tables(model)
    ref = _layer_mean(_dense_adjacency(schema), _ego(model), layers)
    np.testing.assert_allclose(np.concatenate([users, items]), ref, rtol=1e-5, atol=1e-6)


def test_freedom_adds_the_item_id_embeddings_through_the_knn_graph():
    schema = _schema()
    torch.manual_seed(0)
    model = build_model(_cfg("freedom"), schema)
    users, items = _tables(model)
    ref = _layer_mean(_dense_adjacency(schema), _ego(model), 2)
    item_ids = model.item_emb.weight.detach().double().numpy()
    np.testing.assert_allclose(users, ref[:NUM_USERS], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(items, ref[NUM_USERS:] + _item_graph(schema) @ item_ids, rtol=1e-5, atol=1e-6)


def test_freedom_trains_on_its_epochs_pruned_graph_and_evaluates_on_the_whole_one():
    schema = _schema(("text_feat",))
    torch.manual_seed(0)
    model = build_model(_cfg("freedom", edge_dropout=0.5), schema)
    model.train()
    model.new_epoch(3, seed=7)
    first = model.towers().users.detach()
    model.new_epoch(4, seed=7)
    assert not torch.equal(first, model.towers().users)
    model.new_epoch(3, seed=7)
    torch.testing.assert_close(model.towers().users, first, rtol=0, atol=0)
    eval_users, _ = _tables(model)
    ref = _layer_mean(_dense_adjacency(schema), _ego(model), 2)
    np.testing.assert_allclose(eval_users, ref[:NUM_USERS], rtol=1e-5, atol=1e-6)


def test_em3_concatenates_id_and_propagated_multimodal_towers():
    schema = _schema()
    torch.manual_seed(0)
    model = build_model(_cfg("em3_freedom"), schema)
    users, items = _tables(model)
    adj, item_graph = _dense_adjacency(schema), _item_graph(schema)
    with torch.no_grad():
        mm = model.multimodal().double().numpy()
    ego = np.concatenate([np.zeros((NUM_USERS, mm.shape[1])), mm])
    mm_ref = _layer_mean(adj, ego, 2)
    np.testing.assert_allclose(users[:, 4:], mm_ref[:NUM_USERS], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(items[:, 4:], mm_ref[NUM_USERS:] + item_graph @ mm, rtol=1e-5, atol=1e-6)
    id_ref = _layer_mean(adj, _ego(model), 2)
    item_ids = model.item_emb.weight.detach().double().numpy()
    np.testing.assert_allclose(items[:, :4], id_ref[NUM_USERS:] + item_graph @ item_ids, rtol=1e-5, atol=1e-6)


def _batch(users, items) -> Batch:
    b = len(users)
    zeros = torch.zeros(b, dtype=torch.int64)
    return Batch(
        user_id=torch.tensor(users),
        item_id=torch.tensor(items),
        label=torch.ones(b),
        request_id=zeros,
        user_feats=torch.zeros(b, 0, dtype=torch.int64),
        hist_ids=torch.zeros(b, 1, dtype=torch.int64),
        hist_mask=torch.zeros(b, 1, dtype=torch.bool),
    )


@pytest.mark.parametrize("name", ["lightgcn", "freedom", "em3_freedom"])
def test_forward_score_and_full_scores_agree_and_the_eval_cache_follows_training(name):
    torch.manual_seed(0)
    model = build_model(_cfg(name), _schema())
    batch = _batch([1, 2, 5], [3, 8, 1])
    negatives = torch.tensor([2, 4, 6])
    model.eval()
    out = model(batch, negatives)
    full = model.full_scores(batch.user_id)
    torch.testing.assert_close(out.logits, full[torch.arange(3), batch.item_id])
    torch.testing.assert_close(out.negative_logits, full[torch.arange(3), negatives])
    cands = torch.tensor([[1, 2, 8], [3, 3, 0], [7, 6, 5]])
    torch.testing.assert_close(model.score(batch.user_id, None, cands), full.gather(1, cands))
    assert not out.losses  # auxiliary losses are a training matter
    model.train()
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1)
    out = model(batch, negatives)
    loss = bpr(out.logits, out.negative_logits) + sum(out.losses.values())
    assert ("cic" in out.losses) == (name == "em3_freedom")
    loss.backward()
    optimizer.step()
    model.eval()
    assert not torch.allclose(model.full_scores(batch.user_id), full)  # the cache did not outlive training


def test_l2_and_feature_bpr_terms_and_the_checks():
    torch.manual_seed(0)
    model = build_model(_cfg("lightgcn"), _schema())
    model.cfg.loss.l2_weight = 0.5
    model.train()
    out = model(_batch([1, 2], [3, 4]), torch.tensor([5, 6]))
    rows = [model.user_emb.weight[[0, 1]], model.item_emb.weight[[2, 3]], model.item_emb.weight[[4, 5]]]
    torch.testing.assert_close(out.losses["l2"], 0.5 * sum(r.norm() for r in rows) / 2)
    freedom = build_model(_cfg("freedom", feature_bpr_weight=0.1), _schema())
    freedom.train()
    assert set(freedom(_batch([1], [3]), torch.tensor([5])).losses) == {"feature_bpr"}
    assert set(dict(freedom.feature_tables.named_parameters())) == {"text_feat", "image_feat"}
    with pytest.raises(MMRankError, match="negatives has ids"):
        model(_batch([1], [3]), torch.tensor([NUM_ITEMS + 1]))
    with pytest.raises(MMRankError, match=r"has \['text_feat'\], not \['image_feat'\]"):
        build_model(_cfg("freedom", modalities=("image_feat",)), _schema(("text_feat",)))
    with pytest.raises(MMRankError, match="expected none or one of"):
        build_model(_cfg("ngcf"), _schema())


def test_the_same_seed_builds_the_same_model():
    towers = []
    for _ in range(2):
        torch.manual_seed(5)
        towers.append(_tables(build_model(_cfg("em3_freedom"), _schema())))
    for a, b in zip(*towers, strict=True):
        np.testing.assert_array_equal(a, b)
