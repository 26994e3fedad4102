"""FREEDOM (Zhou & Shen, MM 2023) as MMRec implements it (`src/models/freedom.py`).

LightGCN's ID towers plus two graphs:

- a frozen item-item graph: each modality's kNN graph of the raw item features (`graph.knn_graph`),
  mixed with `graph.image_weight` for the image modality (`modality_weights`), built once. The item
  tower adds h = S^L E_item, the item ID embeddings (not the propagated ones) through it
  `graph.item_layers` times: items = LightGCN(items) + h;
- degree-sensitive pruning of the user-item graph: before each epoch a share `graph.edge_dropout` of
  the training interactions is dropped, edges between high-degree nodes most likely
  (`graph.prune_edges`), and the kept graph, normalised on its own degrees, is what that epoch's
  training steps propagate over. Evaluation and export use the whole graph, as MMRec does.

Where MMRec draws the pruned graph from torch's global RNG, it is drawn here from a generator seeded by
(seed, epoch): the same distribution, and a resumed run redraws the epoch's graph exactly.

Loss: BPR on the towers + `graph.feature_bpr_weight` x the sum over modalities of a BPR loss of the
propagated users against each item's projected features (MMRec's reg_weight; each modality keeps a
trainable copy of its raw features and a Linear to `graph.dim`, both used by this loss only). The
modalities are the dataset's item features (`graph.modalities`, empty = all), each pooled to one vector
per item (the masked mean of its tokens; MMRec data has one token).
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import numpy as np
import torch
from torch import Tensor, nn

from common.errors import MMRankError
from trainer.losses import bpr
from trainer.model.config import ModelConfig
from trainer.model.graph import (
    SparseGraph,
    knn_graph,
    mix_graphs,
    modality_weights,
    normalized_adjacency,
    prune_edges,
)
from trainer.model.lightgcn import LightGCN
from trainer.model.ranking_model import ModelSchema
from trainer.model.two_tower import Towers, padded

PRUNING_STREAM = 1  # keeps the pruning draws apart from the row order's default_rng([seed, epoch])


def graph_modalities(cfg: ModelConfig, have: Iterable[str]) -> list[str]:
    """The features the item-item graph reads: `graph.modalities`, or every one the data has (`have`)."""
    have = sorted(have)
    names = list(cfg.graph.modalities) or have
    missing = [n for n in names if n not in have]
    if missing or not names:
        raise MMRankError(
            f"model.graph.model={cfg.graph.model!r} builds its item-item graph from item features; the "
            f"dataset has {have or 'none'}"
            + (f", not {missing}: use --set 'model.graph.modalities={json.dumps(have)}'" if missing else "")
        )
    return names


def pooled_features(feats: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-item features [n + 1, K, D] and mask [n + 1, K] -> the masked mean of the tokens [n, D] and
    whether the item has any [n] (row 0, padding, dropped: 0-based item nodes)."""
    weights = mask[1:].to(torch.float32).unsqueeze(-1)
    pooled = (feats[1:].float() * weights).sum(1) / weights.sum(1).clamp_min(1.0)
    return pooled, mask[1:].any(1)


class Freedom(LightGCN):
    def __init__(self, cfg: ModelConfig, schema: ModelSchema):
        super().__init__(cfg, schema)
        g = cfg.graph
        self.modality_names = graph_modalities(cfg, schema.modalities)
        pooled = {name: pooled_features(*schema.modalities[name]) for name in self.modality_names}
        weights = modality_weights(self.modality_names, g.image_weight)
        mixed = mix_graphs([(knn_graph(*pooled[n], g.knn_k), weights[n]) for n in self.modality_names])
        self.item_graph = SparseGraph(mixed)
        self.pruned_graph: SparseGraph | None = None
        self.feature_tables = nn.ParameterDict()
        self.feature_proj = nn.ModuleDict()
        if g.feature_bpr_weight > 0:
            for name in self.modality_names:
                self.feature_tables[name] = nn.Parameter(pooled[name][0].clone())
                self.feature_proj[name] = nn.Linear(pooled[name][0].shape[1], g.dim)

    def new_epoch(self, epoch: int, seed: int) -> None:
        stream = np.random.default_rng([seed, epoch, PRUNING_STREAM]).integers(2**63)
        generator = torch.Generator().manual_seed(int(stream))
        kept = prune_edges(self.edges, self.cfg.graph.edge_dropout, generator)
        device = self.item_emb.weight.device
        self.pruned_graph = SparseGraph(normalized_adjacency(kept), symmetric=True).to(device)

    def training_graph(self) -> nn.Module:
        if self.pruned_graph is None:  # a training step before any epoch began: epoch 0 of seed 0
            self.new_epoch(0, 0)
        return self.pruned_graph

    def item_graph_term(self, rows: Tensor) -> Tensor:
        """S^L rows: item rows [I, e] through the item-item graph `graph.item_layers` times."""
        for _ in range(self.cfg.graph.item_layers):
            rows = self.item_graph(rows)
        return rows

    def item_graph_inputs(self) -> Tensor:
        """The item rows [I, e] the item-item graph propagates: the item ID embeddings."""
        return self.item_emb.weight

    def placement(self) -> tuple[Tensor, dict[str, tuple[Tensor, Tensor]], dict[str, float]]:
        """What places an item the model never saw (model_repository/item_placement.py): R [I, E], the
        item-item graph inputs after all but its last layer (the item term is S R), each modality's
        pooled features [I, D] and presence [I], and the modality weights."""
        rows = self.item_graph_inputs()
        for _ in range(self.cfg.graph.item_layers - 1):
            rows = self.item_graph(rows)
        features = {name: pooled_features(*self.schema.modalities[name]) for name in self.modality_names}
        return rows, features, modality_weights(self.modality_names, self.cfg.graph.image_weight)

    def towers(self) -> Towers:
        users, items = self.id_towers()
        users = padded(users)
        return Towers(users, padded(items + self.item_graph_term(self.item_emb.weight)), {"id_users": users})

    def aux_losses(
        self, towers: Towers, users: Tensor, items: Tensor, negatives: Tensor
    ) -> dict[str, Tensor]:
        losses = super().aux_losses(towers, users, items, negatives)
        if self.feature_tables:
            u = towers.parts["id_users"][users]
            total = 0.0
            for name, table in self.feature_tables.items():
                projected = self.feature_proj[name](table)
                total = total + bpr(
                    (u * projected[items - 1]).sum(-1), (u * projected[negatives - 1]).sum(-1)
                )
            losses["feature_bpr"] = self.cfg.graph.feature_bpr_weight * total
        return losses
