"""The graph builders against their dense references: normalised user-item adjacency, degree-sensitive
pruning, kNN item-item graphs, their mix, and the sparse product with its gradient."""

import numpy as np
import pytest
import torch

from common.errors import MMRankError
from trainer.model.graph import (
    Edges,
    SparseGraph,
    edge_weights,
    knn_graph,
    knn_graph_reference,
    mix_graphs,
    modality_weights,
    normalized_adjacency,
    normalized_adjacency_reference,
    prune_edges,
)


def _edges(seed: int = 0, users: int = 7, items: int = 9, n: int = 25) -> Edges:
    rng = np.random.default_rng(seed)
    u = rng.integers(1, users + 1, n)
    i = rng.integers(1, items + 1, n)
    return Edges.from_ids(u, i, users, items)


def test_adjacency_is_the_symmetric_normalised_bipartite_graph():
    edges = _edges()
    dense = normalized_adjacency(edges).to_dense().numpy()
    ref = normalized_adjacency_reference(edges.users.numpy(), edges.items.numpy(), 7, 9)
    np.testing.assert_allclose(dense, ref, rtol=1e-6, atol=0)
    np.testing.assert_allclose(dense, dense.T)


def test_edges_drop_repeats_and_refuse_ids_outside_the_data():
    edges = Edges.from_ids(np.array([1, 1, 2]), np.array([3, 3, 1]), 2, 3)
    assert edges.users.tolist() == [0, 1] and edges.items.tolist() == [2, 0]
    with pytest.raises(MMRankError, match="outside"):
        Edges.from_ids(np.array([3]), np.array([1]), 2, 3)


def test_pruning_keeps_the_share_and_draws_edges_by_inverse_sqrt_degree():
    # A hub user with 8 single-user items, and a pair of degree-1 nodes: keeping one edge of 9 picks
    # the pair's edge with probability 1 / (1 + 8 / sqrt(8)) = 0.261, each hub edge 0.092.
    edges = Edges.from_ids(np.array([1] * 8 + [2]), np.arange(1, 10), 2, 9)
    weights = edge_weights(edges)
    gen = torch.Generator().manual_seed(0)
    counts = np.zeros(9)
    for _ in range(4000):
        kept = prune_edges(edges, 0.8, gen)  # floor(9 * 0.2) = 1 edge
        assert len(kept) == 1
        counts[kept.items.item()] += 1
    expected = (weights / weights.sum()).numpy()
    np.testing.assert_allclose(counts / 4000, expected, atol=0.025)
    assert counts[8] > 2 * counts[:8].max()


def test_pruned_graph_is_normalised_on_its_own_degrees_and_reproducible():
    edges = _edges(1, n=40)
    kept = prune_edges(edges, 0.5, torch.Generator().manual_seed(3))
    again = prune_edges(edges, 0.5, torch.Generator().manual_seed(3))
    assert len(kept) == int(len(edges) * 0.5) and torch.equal(kept.items, again.items)
    pairs = set(zip(edges.users.tolist(), edges.items.tolist(), strict=True))
    kept_pairs = list(zip(kept.users.tolist(), kept.items.tolist(), strict=True))
    assert len(set(kept_pairs)) == len(kept_pairs) and set(kept_pairs) <= pairs
    ref = normalized_adjacency_reference(kept.users.numpy(), kept.items.numpy(), 7, 9)
    np.testing.assert_allclose(normalized_adjacency(kept).to_dense().numpy(), ref, rtol=1e-6)
    assert prune_edges(edges, 0.0, torch.Generator()) is edges


@pytest.mark.parametrize("k", [1, 3, 50])
def test_knn_graph_matches_the_dense_top_k(k):
    rng = np.random.default_rng(k)
    feats = rng.normal(size=(30, 6)).astype(np.float32)
    mask = np.ones(30, dtype=bool)
    mask[4] = False  # no feature: a self-loop only, nobody's neighbour
    feats[9] = 0.0  # an all-zero vector counts as missing too
    graph = knn_graph(torch.from_numpy(feats), torch.from_numpy(mask), k, block=7).to_dense().numpy()
    np.testing.assert_allclose(graph, knn_graph_reference(feats, mask, k), rtol=1e-6)
    assert graph[:, 4].sum() == graph[4, 4] == pytest.approx(1.0, rel=1e-6)
    present = mask & (np.abs(feats).sum(1) > 0)
    assert (graph[present].astype(bool).sum(1) == min(k, present.sum())).all()
    assert (np.diag(graph)[present] > 0).all()  # every item is its own nearest neighbour


def test_modality_weights_and_the_mixed_graph():
    assert modality_weights(["image_feat", "text_feat"], 0.1) == {"image_feat": 0.1, "text_feat": 0.9}
    assert modality_weights(["text_feat"], 0.1) == {"text_feat": 1.0}
    assert modality_weights(["image_feat"], 0.1) == {"image_feat": 1.0}
    assert modality_weights(["a", "b"], 0.1) == {"a": 0.5, "b": 0.5}
    a = torch.eye(3).to_sparse()
    b = torch.ones(3, 3).to_sparse()
    np.testing.assert_allclose(mix_graphs([(a, 0.1), (b, 0.9)]).to_dense(), 0.1 * np.eye(3) + 0.9)


@pytest.mark.parametrize("symmetric", [True, False])
def test_sparse_graph_product_and_gradient_match_torch_sparse_mm(symmetric):
    gen = torch.Generator().manual_seed(0)
    if symmetric:
        coo = normalized_adjacency(_edges(2))
    else:
        coo = knn_graph(torch.randn(16, 4, generator=gen), torch.ones(16, dtype=torch.bool), 3)
    x = torch.randn(coo.shape[1], 5, generator=gen, requires_grad=True)
    out = SparseGraph(coo, symmetric)(x)
    (out * torch.arange(out.numel()).reshape(out.shape)).sum().backward()
    grad, x.grad = x.grad, None
    ref = torch.sparse.mm(coo, x)
    (ref * torch.arange(ref.numel()).reshape(ref.shape)).sum().backward()
    torch.testing.assert_close(out, ref)
    torch.testing.assert_close(grad, x.grad)
