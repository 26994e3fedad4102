"""The graphs of the two-tower models, as torch sparse tensors (never a dense N x N matrix).

Nodes are 0-based: users 0..U-1 and items 0..I-1 (canonical id - 1). Every formula is MMRec's, 1e-7 on
the degrees included, so the graphs hold the same numbers as MMRec's LightGCN and FREEDOM:

- `normalized_adjacency`: the user-item graph [users; items] x [users; items], entries
  (u, U + i) and (U + i, u) = 1 / sqrt(d_u d_i) for every training interaction (LightGCN eq. 7).
- `prune_edges`: FREEDOM's degree-sensitive pruning. floor(E (1 - dropout)) edges are kept, drawn
  without replacement with probability proportional to 1 / sqrt(d_u d_i), so edges between
  high-degree nodes go first; the kept graph is normalised again on its own degrees.
- `knn_graph`: one modality's item-item graph. Each item links to its k most cosine-similar items
  (itself included: it is the most similar, as in MMRec's top-k over the whole similarity row), entries
  r_i^-1/2 r_j^-1/2 with r the row degree (so 1/k everywhere). Similarities are computed in row blocks.
  An item without the feature (masked, or an all-zero vector, where MMRec would divide by zero) is no
  item's neighbour and links to itself only; k shrinks to the number of items that have the feature.
- `mix_graphs`: FREEDOM's weighted sum of the modalities' graphs (image 0.1, text 0.9: `modality_weights`).

`SparseGraph` holds a built graph for propagation: y = A x as a CSR product, and the gradient A^T g
as another one with A^T kept beside A (the same tensor for a symmetric graph). torch's own backward
through a sparse product transposes A on every call, ten times the product's cost on the CPU; the
test compares both with torch.sparse.mm's forward and gradient.

Each builder has a dense numpy reference at the bottom of this file, which the tests compare it with.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn

from common.errors import MMRankError

DEGREE_EPS = 1e-7  # MMRec adds it to every degree before the inverse square root


@dataclass
class Edges:
    """Training interactions: user and item node indices [E] (0-based, distinct pairs)."""

    users: Tensor
    items: Tensor
    num_users: int
    num_items: int

    @classmethod
    def from_ids(cls, user_ids: np.ndarray, item_ids: np.ndarray, num_users: int, num_items: int) -> Edges:
        """Canonical 1-based ids (repeats dropped, sorted by user then item) -> 0-based nodes."""
        pairs = np.stack([np.asarray(user_ids), np.asarray(item_ids)], 1).astype(np.int64).reshape(-1, 2)
        pairs = np.unique(pairs, axis=0)
        if len(pairs) and not ((pairs >= 1).all() and (pairs <= (num_users, num_items)).all()):
            raise MMRankError(f"interaction ids outside users 1..{num_users} or items 1..{num_items}")
        nodes = torch.from_numpy(pairs - 1)
        return cls(nodes[:, 0].contiguous(), nodes[:, 1].contiguous(), num_users, num_items)

    def __len__(self) -> int:
        return int(self.users.numel())

    def subset(self, keep: Tensor) -> Edges:
        return Edges(self.users[keep], self.items[keep], self.num_users, self.num_items)


def _inv_sqrt_degree(nodes: Tensor, count: int) -> Tensor:
    degree = torch.bincount(nodes, minlength=count).to(torch.float32) + DEGREE_EPS
    return degree.pow(-0.5)


def edge_weights(edges: Edges) -> Tensor:
    """1 / sqrt(d_u d_i) of every edge [E], degrees counted on `edges` themselves."""
    return (
        _inv_sqrt_degree(edges.users, edges.num_users)[edges.users]
        * _inv_sqrt_degree(edges.items, edges.num_items)[edges.items]
    )


def normalized_adjacency(edges: Edges) -> Tensor:
    """The symmetric normalised user-item adjacency, sparse COO [(U + I), (U + I)], coalesced."""
    values = edge_weights(edges)
    items = edges.items + edges.num_users
    index = torch.stack([torch.cat([edges.users, items]), torch.cat([items, edges.users])])
    n = edges.num_users + edges.num_items
    return torch.sparse_coo_tensor(
        index, torch.cat([values, values]), (n, n), check_invariants=False
    ).coalesce()


def prune_edges(edges: Edges, dropout: float, generator: torch.Generator) -> Edges:
    """FREEDOM's degree-sensitive pruning: the kept edges, floor(E (1 - dropout)) of them."""
    if not 0.0 <= dropout < 1.0:
        raise MMRankError(f"edge dropout must lie in [0, 1), got {dropout}")
    keep = int(len(edges) * (1.0 - dropout))
    if dropout == 0.0 or keep == len(edges):
        return edges
    if keep == 0:
        raise MMRankError(f"edge dropout {dropout} keeps none of the {len(edges)} training interactions")
    drawn = torch.multinomial(edge_weights(edges), keep, replacement=False, generator=generator)
    return edges.subset(drawn)


def _present(features: Tensor, mask: Tensor) -> Tensor:
    return mask.bool() & (features.norm(dim=1) > 0)


def knn_graph(features: Tensor, mask: Tensor, k: int, block: int = 1024) -> Tensor:
    """features [N, D], mask [N] (False: the item has no such feature) -> sparse COO [N, N], coalesced."""
    if k < 1:
        raise MMRankError(f"knn_k must be >= 1, got {k}")
    n = features.shape[0]
    present = _present(features, mask)
    unit = features / features.norm(dim=1, keepdim=True).clamp_min(torch.finfo(features.dtype).tiny)
    kept = int(present.sum())
    k = min(k, kept)
    rows, cols = [torch.arange(n)[~present]], [torch.arange(n)[~present]]  # alone: a self-loop
    if k:
        ids = torch.arange(n)[present]
        candidates = unit[present]
        for part in ids.split(block):
            similarity = unit[part] @ candidates.T
            top = similarity.topk(k, dim=1).indices
            rows.append(part.repeat_interleave(k))
            cols.append(ids[top].reshape(-1))
    index = torch.stack([torch.cat(rows), torch.cat(cols)])
    inv = torch.bincount(index[0], minlength=n).to(torch.float32).add(DEGREE_EPS).pow(-0.5)
    return torch.sparse_coo_tensor(
        index, inv[index[0]] * inv[index[1]], (n, n), check_invariants=False
    ).coalesce()


def modality_weights(names: Sequence[str], image_weight: float) -> dict[str, float]:
    """Each modality's share of the mixed item-item graph: a modality named like "image" gets
    `image_weight` and the others split the rest equally (MMRec's image/text pair: 0.1 and 0.9); with one
    modality, or none named image, the shares are equal."""
    if not names:
        raise MMRankError("the item-item graph needs at least one item feature")
    if not 0.0 <= image_weight <= 1.0:
        raise MMRankError(f"graph.image_weight must lie in [0, 1], got {image_weight}")
    images = [n for n in names if "image" in n]
    if len(names) == 1 or not images or len(images) == len(names):
        return {n: 1.0 / len(names) for n in names}
    others = [n for n in names if n not in images]
    return {
        **{n: image_weight / len(images) for n in images},
        **{n: (1.0 - image_weight) / len(others) for n in others},
    }


def mix_graphs(graphs: Sequence[tuple[Tensor, float]]) -> Tensor:
    """sum_m w_m A_m of sparse [N, N] graphs, coalesced."""
    total = None
    for graph, weight in graphs:
        total = graph * weight if total is None else total + graph * weight
    return total.coalesce()


class _Product(torch.autograd.Function):
    @staticmethod
    def forward(ctx, matrix: Tensor, transpose: Tensor, x: Tensor) -> Tensor:
        ctx.save_for_backward(transpose)
        return matrix @ x

    @staticmethod
    def backward(ctx, grad: Tensor):
        (transpose,) = ctx.saved_tensors
        return None, None, transpose @ grad


class SparseGraph(nn.Module):
    """A fixed sparse [N, M] matrix as a module: `graph(x)` = A x for x [M, e], differentiable in x.
    The CSR copies are non-persistent buffers: they move with the model and are rebuilt from data."""

    def __init__(self, coo: Tensor, symmetric: bool = False):
        super().__init__()
        with warnings.catch_warnings():  # torch calls its CSR support beta on every first use
            warnings.simplefilter("ignore", UserWarning)
            matrix = coo.coalesce().to_sparse_csr()
            transpose = matrix if symmetric else coo.t().coalesce().to_sparse_csr()
        self.register_buffer("matrix", matrix, persistent=False)
        self.register_buffer("transpose", transpose, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        return _Product.apply(self.matrix, self.transpose, x)


# ---- references ------------------------------------------------------------------------------------
def normalized_adjacency_reference(
    users: np.ndarray, items: np.ndarray, num_users: int, num_items: int
) -> np.ndarray:
    """Dense D^-1/2 A D^-1/2 of the bipartite graph (MMRec's scipy construction, spelled out)."""
    n = num_users + num_items
    a = np.zeros((n, n))
    a[users, num_users + items] = 1.0
    a[num_users + items, users] = 1.0
    d = (a.sum(1) + DEGREE_EPS) ** -0.5
    return d[:, None] * a * d[None, :]


def knn_graph_reference(features: np.ndarray, mask: np.ndarray, k: int) -> np.ndarray:
    """Dense kNN graph: full cosine similarity matrix, each row's k largest among the present items."""
    present = mask.astype(bool) & (np.linalg.norm(features, axis=1) > 0)
    n = len(features)
    unit = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-30)
    similarity = np.where(present[None, :], unit @ unit.T, -np.inf)
    k = min(k, int(present.sum()))
    a = np.zeros((n, n))
    for i in range(n):
        if present[i]:
            a[i, np.argsort(-similarity[i], kind="stable")[:k]] = 1.0
        else:
            a[i, i] = 1.0
    d = (a.sum(1) + DEGREE_EPS) ** -0.5
    return d[:, None] * a * d[None, :]
