"""EM3 on FREEDOM: the model of EM3's public evaluation (Table 10), as its MMRec code defines it
(`src/models/em3.py`, `src/common/transformer.py` and `src/configs/model/EM3.yaml` of
github.com/em3e2e-anonymous/em3).

FREEDOM's ID towers and graphs (`freedom.py`: frozen kNN item-item graph, degree-sensitive pruning of
the user-item graph) plus a multimodal tower:

- every item's multimodal embedding m: its modality features, each token through a Linear to
  `content.d` (EM3's code: a bare Linear per modality), fused by our FQ-Former
  (`trainer.model.fq_former`: `content.num_queries` queries, `content.fusion_layers` self-attention
  layers of `content.fusion_heads` heads without FFN, hidden dropout `content.dropout`, the queries'
  outputs through EM3's mm_proj), computed for all items on every step from the frozen features;
- m propagated as the IDs are: hm = S^L m through the item-item graph, and [0 for users; m for items]
  through the (pruned) user-item graph with LightGCN's layer mean -> (u_MM, i_MM + hm);
- the score <[u_ID ‖ u_MM], [i_ID ‖ i_MM]>, trained with BPR;
- CIC between i_MM and i_ID (each through its own Linear to `loss.cic_dim`, L2-normalised) over all
  items on every step, `loss.cic_negatives` (16) drawn per item, temperature `loss.cic_tau`, weight
  `loss.cic_alpha` (1e-3), by our `trainer.losses.cic_loss`.

Where this differs from EM3's code: its loop `hm = mm_adj @ mm_embedding` ignores the previous hm; with
one item-item layer, the setting, both agree, and more layers repeat the propagation here. A modality token an item lacks is masked in the FQ-Former (the code would project a
zero vector; MMRec data has every row). Where the paper and the code differ (CIC weight 0.1 vs 1e-3,
Q = 2 vs Q in {1, 2}), the presets follow the code and its logs: Table 10's numbers come from them.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from trainer.losses import cic_loss
from trainer.model.config import ModelConfig
from trainer.model.fq_former import FQFormer
from trainer.model.freedom import Freedom
from trainer.model.ranking_model import ModelSchema
from trainer.model.two_tower import Towers, padded


class EM3Freedom(Freedom):
    def __init__(self, cfg: ModelConfig, schema: ModelSchema):
        super().__init__(cfg, schema)
        c, loss = cfg.content, cfg.loss
        self.token_proj = nn.ModuleDict()
        for name in self.modality_names:
            feats, mask = schema.modalities[name]
            self.register_buffer(f"tokens_{name}", feats[1:].float(), persistent=False)
            self.register_buffer(f"mask_{name}", mask[1:].bool(), persistent=False)
            self.token_proj[name] = nn.Linear(feats.shape[-1], c.d)
        self.fusion = FQFormer(c.d, c.num_queries, c.fusion_layers, c.fusion_heads, c.dropout)
        self.cic_content = nn.Linear(c.d, loss.cic_dim)
        self.cic_ids = nn.Linear(cfg.graph.dim, loss.cic_dim)

    def content_module(self) -> nn.Module:
        return nn.ModuleList([self.token_proj, self.fusion])

    def multimodal(self) -> Tensor:
        """Every item's multimodal embedding m [I, d] from its frozen features."""
        tokens, masks = [], []
        for name, proj in self.token_proj.items():
            tokens.append(proj(getattr(self, f"tokens_{name}")))
            masks.append(getattr(self, f"mask_{name}"))
        return self.fusion(torch.cat(tokens, 1), torch.cat(masks, 1))

    def item_graph_inputs(self) -> Tensor:
        """[item ID embeddings | multimodal embeddings]: both halves go through the item-item graph."""
        return torch.cat([self.item_emb.weight, self.multimodal()], 1)

    def towers(self) -> Towers:
        # Both halves go through the same graphs, so they propagate as one [ID | MM] matrix: the same
        # numbers as two propagations, at one sparse product per layer.
        mm = self.multimodal()
        ego_users = torch.cat([self.user_emb.weight, mm.new_zeros(self.schema.num_users, mm.shape[1])], 1)
        users, items = self.propagate_nodes(ego_users, torch.cat([self.item_emb.weight, mm], 1))
        items = items + self.item_graph_term(torch.cat([self.item_emb.weight, mm], 1))
        dim = self.cfg.graph.dim
        return Towers(
            padded(users),
            padded(items),
            {"id_users": padded(users[:, :dim]), "id_items": items[:, :dim], "mm_items": items[:, dim:]},
        )

    def aux_losses(
        self, towers: Towers, users: Tensor, items: Tensor, negatives: Tensor
    ) -> dict[str, Tensor]:
        losses = super().aux_losses(towers, users, items, negatives)
        loss = self.cfg.loss
        if loss.cic_alpha > 0:
            content, ids = self.cic_content(towers.parts["mm_items"]), self.cic_ids(towers.parts["id_items"])
            every_item = torch.arange(content.shape[0], device=content.device)
            losses["cic"] = loss.cic_alpha * cic_loss(
                content, ids, every_item, loss.cic_tau, loss.cic_negatives
            )
        return losses
