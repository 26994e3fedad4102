"""Two-tower models: one vector per user and per item, scored by their dot product.

The graph models (`lightgcn.py`, `freedom.py`, `em3_freedom.py`) compute every user's and item's vector
at once, by propagating embeddings over graphs (`towers`), on every training step as MMRec does.
`TwoTowerModel` gives them the interface the trainer, the evaluation and the export share with
RankingModel:

- `forward(batch, negatives)`: logits <u, i> of the batch's targets and, for BPR, of the sampled
  negatives, with the model's auxiliary losses (training only);
- `score(user_id, user_feats, cand_ids, ...)` -> [B, N]; `full_scores(user_id)` -> [B, I + 1], every item
  at once (the top-K evaluation);
- `tables()` -> (users [U + 1, E], items [I + 1, E]): the user and item tables export writes;
- `new_epoch(epoch, seed)` (FREEDOM redraws its pruned graph) and `param_groups(...)`.

Ids are the canonical ones: row u of the user table is user u, row i of the item table item i; row 0 of
both is padding, all zeros (an unknown user scores 0 against every item). Node indices inside the graph
modules are 0-based (id - 1) and the embedding tables have exactly MMRec's shapes, so the Xavier
initialisation draws from MMRec's bounds. In eval mode the towers are computed once and kept until
the model trains again, moves or loads weights: evaluation and export propagate once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from common.errors import MMRankError
from trainer.data.batch import Batch
from trainer.model.config import ModelConfig
from trainer.model.graph import Edges
from trainer.model.param_groups import param_groups
from trainer.model.ranking_model import ModelOutput, ModelSchema, check_ids


@dataclass
class Towers:
    users: Tensor  # [num_users + 1, E], row 0 zeros
    items: Tensor  # [num_items + 1, E], row 0 zeros
    parts: dict[str, Tensor] = field(default_factory=dict)  # intermediate results the aux losses read


def padded(rows: Tensor) -> Tensor:
    """0-based node rows [N, E] -> id-indexed rows [N + 1, E] with the zero padding row 0 on top."""
    return F.pad(rows, (0, 0, 1, 0))


class TwoTowerModel(nn.Module):
    """Base of the graph models: subclasses build their modules and implement `towers` and
    `aux_losses`."""

    def __init__(self, cfg: ModelConfig, schema: ModelSchema):
        super().__init__()
        if schema.train_edges is None:
            raise MMRankError("a graph model needs the training interactions (ModelSchema.train_edges)")
        self.cfg, self.schema = cfg, schema
        self.edges = Edges.from_ids(*schema.train_edges, schema.num_users, schema.num_items)
        self._cached: Towers | None = None

    # ---- what subclasses provide --------------------------------------------------------------------
    def towers(self) -> Towers:
        """Every user's and item's vector, on the training graph in training mode."""
        raise NotImplementedError

    def aux_losses(
        self, towers: Towers, users: Tensor, items: Tensor, negatives: Tensor
    ) -> dict[str, Tensor]:
        """Weighted auxiliary losses of a training step (ids of the batch's users, targets, negatives)."""
        return {}

    def content_module(self) -> nn.Module | None:
        """The module trained at train.lr_content (EM3's fusion); None: everything at lr_ranker."""
        return None

    def new_epoch(self, epoch: int, seed: int) -> None:
        """Called before each training epoch (a pure function of (epoch, seed): resumes redraw alike)."""

    # ---- the shared interface -----------------------------------------------------------------------
    def tables(self) -> tuple[Tensor, Tensor]:
        """(users [U + 1, E], items [I + 1, E]); in eval mode computed once without autograd and kept."""
        if self.training:
            towers = self.towers()
        else:
            if self._cached is None:
                with torch.no_grad():
                    self._cached = self.towers()
            towers = self._cached
        return towers.users, towers.items

    def forward(self, batch: Batch, negatives: Tensor | None = None) -> ModelOutput:
        check_ids("batch.user_id", batch.user_id, self.schema.num_users)
        check_ids("batch.item_id", batch.item_id, self.schema.num_items)
        if negatives is not None:
            if tuple(negatives.shape) != tuple(batch.item_id.shape):
                raise MMRankError(f"negatives has shape {tuple(negatives.shape)}, expected ({len(batch)},)")
            check_ids("negatives", negatives, self.schema.num_items)
        if self.training:
            towers = self.towers()
            users, items = towers.users, towers.items
        else:
            users, items = self.tables()
        u = users[batch.user_id]
        logits = (u * items[batch.item_id]).sum(-1)
        negative_logits = None if negatives is None else (u * items[negatives]).sum(-1)
        losses = {}
        if self.training and negatives is not None:
            losses = self.aux_losses(towers, batch.user_id, batch.item_id, negatives)
        return ModelOutput(logits, losses, {}, negative_logits)

    def score(self, user_id: Tensor, user_feats: Tensor, cand_ids: Tensor, *content, targets=None) -> Tensor:
        """Logits [B, N] of candidates cand_ids [B, N] for users user_id [B]: <user row, item row>.
        RankingModel's content arguments are accepted and unused (this model reads no history)."""
        users, items = self.tables()
        return torch.einsum("be,bne->bn", users[user_id], items[cand_ids])

    def full_scores(self, user_id: Tensor) -> Tensor:
        """Logits [B, I + 1] of every item (column 0: padding) for users user_id [B]."""
        users, items = self.tables()
        return users[user_id] @ items.T

    def param_groups(self, lr_content: float, lr_ranker: float, weight_decay: float) -> list[dict]:
        return param_groups(self, self.content_module(), lr_content, lr_ranker, weight_decay)

    # ---- the eval-mode cache ------------------------------------------------------------------------
    def train(self, mode: bool = True) -> TwoTowerModel:
        self._cached = None
        return super().train(mode)

    def _apply(self, fn, recurse: bool = True):
        self._cached = None
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):
        self._cached = None
        super()._load_from_state_dict(*args, **kwargs)
