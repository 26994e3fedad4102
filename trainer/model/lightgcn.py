"""LightGCN (He et al., SIGIR 2020) as MMRec implements it (`src/models/lightgcn.py`).

User and item ID embeddings (Xavier-uniform, `graph.dim` wide) are the layer-0 ("ego") vectors; each
layer multiplies by the normalised user-item adjacency (no feature transform, no non-linearity, no
self-loop) and the towers are the mean of layers 0..L (alpha_k = 1 / (L + 1)):

    E^(l+1) = D^-1/2 A D^-1/2 E^(l),    [users; items] = mean_l E^(l)

recomputed on every training step over the graph of the training interactions. Loss: BPR on the
towers (the trainer's main loss) + `loss.l2_weight` x MMRec's EmbLoss of the batch's ego rows (user,
positive, negative). Items without training interactions keep their initial random rows (MMRec's
sampler never draws them as negatives either, so they never train).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trainer.losses import emb_loss
from trainer.model.config import ModelConfig
from trainer.model.graph import SparseGraph, normalized_adjacency
from trainer.model.ranking_model import ModelSchema
from trainer.model.two_tower import Towers, TwoTowerModel, padded


def propagate(graph: nn.Module, ego: Tensor, layers: int) -> Tensor:
    """mean(E, A E, ..., A^L E) for ego rows E [N, e] and a graph module (x -> A x)."""
    total, x = ego, ego
    for _ in range(layers):
        x = graph(x)
        total = total + x
    return total / (layers + 1)


class LightGCN(TwoTowerModel):
    def __init__(self, cfg: ModelConfig, schema: ModelSchema):
        super().__init__(cfg, schema)
        dim = cfg.graph.dim
        self.user_emb = nn.Embedding(schema.num_users, dim)
        self.item_emb = nn.Embedding(schema.num_items, dim)
        nn.init.xavier_uniform_(self.user_emb.weight)
        nn.init.xavier_uniform_(self.item_emb.weight)
        self.ui_graph = SparseGraph(normalized_adjacency(self.edges), symmetric=True)

    def training_graph(self) -> nn.Module:
        """The user-item graph a training step propagates over (FREEDOM: this epoch's pruned one)."""
        return self.ui_graph

    def current_graph(self) -> nn.Module:
        """The training graph in training mode, the whole user-item graph otherwise."""
        return self.training_graph() if self.training else self.ui_graph

    def propagate_nodes(self, users: Tensor, items: Tensor) -> tuple[Tensor, Tensor]:
        """Ego rows of users [U, e] and items [I, e] (0-based) -> their LightGCN layer means."""
        out = propagate(self.current_graph(), torch.cat([users, items]), self.cfg.graph.ui_layers)
        return out[: self.schema.num_users], out[self.schema.num_users :]

    def id_towers(self) -> tuple[Tensor, Tensor]:
        """LightGCN's user rows [U, e] and item rows [I, e] (0-based) of the ID embeddings."""
        return self.propagate_nodes(self.user_emb.weight, self.item_emb.weight)

    def towers(self) -> Towers:
        users, items = self.id_towers()
        return Towers(padded(users), padded(items))

    def aux_losses(
        self, towers: Towers, users: Tensor, items: Tensor, negatives: Tensor
    ) -> dict[str, Tensor]:
        weight = self.cfg.loss.l2_weight
        if weight <= 0:
            return {}
        rows = (self.user_emb(users - 1), self.item_emb(items - 1), self.item_emb(negatives - 1))
        return {"l2": weight * emb_loss(*rows)}
