"""The ranker: ID embeddings + content features -> logit (docs/design.md, "Ranker").

Features are grouped into tokens: the user token (user id + user feature embeddings), the item token
(item id + item categorical embeddings, looked up inside from the candidate ids exactly as the serving
lookup does) and one token per content feature (c, u, decoder output, similarity features).
`mixer = "mlp"` concatenates the tokens into the MLP head; `"rankmixer"` (arXiv 2507.15551) first
projects every token to a common width and runs RankMixer layers (parameter-free multi-head token
mixing, then a per-token FFN, each with residual + LayerNorm), then the same MLP head; `"dot"` is
matrix factorisation (BPR-MF): the logit is <user ID embedding, item ID embedding>, nothing else.

Cold items: `item_known` (a buffer saved in checkpoints) marks the items that were training targets;
every other id, padding included, reads the shared "new item" row 0 of the item ID table, in training,
evaluation and the exported item table alike (the table's row for id 0, where serving sends unknown
ids, is that row too). Untrained rows would otherwise be their N(0, 1) initialisation: noise exactly
where content should speak. `item_id_dropout` sends a share of training targets' ID lookups to row 0
as well (their categoricals stay), so the row is trained on what an uninformative ID means and the
ranker learns to lean on content then. Candidates a training pass scores that are not its targets
(BPR's sampled negatives, `targets` in `forward`) are not marked and take no ID dropout: they read ID
rows as evaluation does, so an item drawn as a negative (a valid- or test-only item too) keeps the
new-item row. A checkpoint written before the buffer existed loads with every item known (the old
behaviour).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from common.errors import MMRankError
from trainer.model.config import RankerConfig

MIXERS = ("mlp", "rankmixer", "dot")
NEW_ITEM = 0  # the shared ID row of items without training interactions (and of padding)


def mlp(in_dim: int, hidden: Sequence[int], dropout: float) -> nn.Sequential:
    """Linear-ReLU-Dropout blocks, then a Linear to one logit."""
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU(), nn.Dropout(dropout)]
        in_dim = width
    return nn.Sequential(*layers, nn.Linear(in_dim, 1))


def token_mix(x: Tensor, tokens: int) -> Tensor:
    """RankMixer's parameter-free token mixing of x [..., T, D]: split every token into T heads and
    make new token h the concatenation of head h of every token."""
    return x.unflatten(-1, (tokens, -1)).transpose(-2, -3).flatten(-2)


class RankMixerLayer(nn.Module):
    """x [..., T, D] -> LN(x + token_mix(x)) -> LN(x + per-token FFN(x)), each token its own FFN."""

    def __init__(self, tokens: int, width: int, dropout: float, expansion: int = 2):
        super().__init__()
        self.tokens = tokens
        hidden = expansion * width
        self.w1 = nn.Parameter(_uniform((tokens, width, hidden), width))
        self.b1 = nn.Parameter(torch.zeros(tokens, hidden))
        self.w2 = nn.Parameter(_uniform((tokens, hidden, width), hidden))
        self.b2 = nn.Parameter(torch.zeros(tokens, width))
        self.norm_mix, self.norm_ffn = nn.LayerNorm(width), nn.LayerNorm(width)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm_mix(x + token_mix(x, self.tokens))
        h = F.gelu(torch.einsum("...td,tdh->...th", x, self.w1) + self.b1)
        out = torch.einsum("...th,thd->...td", self.dropout(h), self.w2) + self.b2
        return self.norm_ffn(x + out)


def _uniform(shape: tuple[int, ...], fan_in: int) -> Tensor:
    bound = 1.0 / math.sqrt(fan_in)
    return torch.empty(shape).uniform_(-bound, bound)


class RankMixer(nn.Module):
    """Feature tokens of any widths -> [..., T * width] after `layers` RankMixer layers."""

    def __init__(self, token_dims: Sequence[int], width: int, layers: int, dropout: float):
        super().__init__()
        tokens = len(token_dims)
        width = tokens * math.ceil(width / tokens)  # token mixing splits each token into T heads
        self.out_dim = tokens * width
        self.inputs = nn.ModuleList(nn.Linear(dim, width) for dim in token_dims)
        self.layers = nn.ModuleList(RankMixerLayer(tokens, width, dropout) for _ in range(layers))

    def forward(self, tokens: Sequence[Tensor]) -> Tensor:
        x = torch.stack([proj(t) for proj, t in zip(self.inputs, tokens, strict=True)], dim=-2)
        for layer in self.layers:
            x = layer(x)
        return x.flatten(-2)


class Ranker(nn.Module):
    """(user, candidates [B, N], content features [B, N, dim_i]) -> logits [B, N]."""

    def __init__(
        self,
        cfg: RankerConfig,
        num_users: int,
        num_items: int,
        item_cats: Tensor,
        item_cat_cards: Sequence[int],
        user_feat_cards: Sequence[int],
        content_dims: Sequence[int],
    ):
        super().__init__()
        if cfg.mixer not in MIXERS:
            raise MMRankError(f"unknown ranker mixer {cfg.mixer!r}; expected one of {MIXERS}")
        if tuple(item_cats.shape) != (num_items + 1, len(item_cat_cards)):
            raise MMRankError(
                f"item_cats has shape {tuple(item_cats.shape)}, expected ({num_items + 1}, {len(item_cat_cards)})"
            )
        if not 0.0 <= cfg.item_id_dropout < 1.0:
            raise MMRankError(f"ranker.item_id_dropout must lie in [0, 1), got {cfg.item_id_dropout}")
        dot = cfg.mixer == "dot"
        if dot and (content_dims or not cfg.use_item_id):
            raise MMRankError(
                "ranker.mixer 'dot' (matrix factorisation) needs item IDs and no content features"
            )
        if dot:  # MF scores IDs only: no categorical or user-feature embeddings
            item_cat_cards, user_feat_cards = (), ()
        e = cfg.id_dim
        self.id_dropout = cfg.item_id_dropout
        self.user_emb = nn.Embedding(num_users + 1, e)
        self.user_feat_embs = nn.ModuleList(nn.Embedding(card, e) for card in user_feat_cards)
        self.item_emb = nn.Embedding(num_items + 1, e) if cfg.use_item_id else None
        if dot:  # MMRec's BPR initialisation: N(0, 1) rows would start dot products at std sqrt(e)
            nn.init.xavier_normal_(self.user_emb.weight)
            nn.init.xavier_normal_(self.item_emb.weight)
        if self.item_emb is not None:
            with torch.no_grad():
                self.item_emb.weight[NEW_ITEM].zero_()  # a neutral start; ID dropout trains it
        self.cat_embs = nn.ModuleList(nn.Embedding(card, e) for card in item_cat_cards)
        cats = item_cats[:, : len(item_cat_cards)].to(torch.int64)
        self.register_buffer("item_cats", cats, persistent=False)
        self.register_buffer("item_known", torch.zeros(num_items + 1, dtype=torch.bool))
        self.user_dim = e * (1 + len(user_feat_cards))
        self.item_dim = e * (int(cfg.use_item_id) + len(item_cat_cards))
        token_dims = [self.user_dim, *([self.item_dim] if self.item_dim else []), *content_dims]
        self.mixer: RankMixer | None = None
        self.head: nn.Module | None = None
        if cfg.mixer == "rankmixer":
            self.mixer = RankMixer(token_dims, cfg.token_dim, cfg.mixer_layers, cfg.dropout)
            self.head = mlp(self.mixer.out_dim, cfg.hidden, cfg.dropout)
        elif cfg.mixer == "mlp":
            self.head = mlp(sum(token_dims), cfg.hidden, cfg.dropout)

    @torch.no_grad()
    def mark_known(self, item_ids: Tensor) -> None:
        """Record training targets (all ranks' under DDP, so every replica maps ids alike)."""
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            item_ids = _all_gather_ids(item_ids.reshape(-1))
        self.item_known[item_ids] = True
        self.item_known[NEW_ITEM] = False

    def user_features(self, user_id: Tensor, user_feats: Tensor) -> Tensor:
        """[B] user ids, [B, U] features -> [B, user_dim]."""
        embs = [self.user_emb(user_id)] + [emb(user_feats[:, i]) for i, emb in enumerate(self.user_feat_embs)]
        return torch.cat(embs, dim=-1)

    def item_features(self, item_ids: Tensor) -> Tensor:
        """[...] item ids -> [..., item_dim]: item id embedding (the new-item row for items never
        trained on) and item categorical embeddings."""
        return self._item_token(item_ids, self._id_rows(item_ids))

    def id_embeddings(self, user_id: Tensor, item_ids: Tensor) -> tuple[Tensor, Tensor]:
        """The user ID rows [B, e] and the item ID rows [..., e] that evaluation reads (the new-item row
        for items never trained on): what MMRec's L2 penalty (`loss.l2_weight`) regularises."""
        return self.user_emb(user_id), self.item_emb(self._id_rows(item_ids))

    def _id_rows(self, item_ids: Tensor) -> Tensor:
        return torch.where(self.item_known[item_ids], item_ids, NEW_ITEM)

    def _item_token(self, item_ids: Tensor, id_rows: Tensor) -> Tensor:
        cats = self.item_cats[item_ids]
        embs = [self.item_emb(id_rows)] if self.item_emb is not None else []
        embs += [emb(cats[..., i]) for i, emb in enumerate(self.cat_embs)]
        return torch.cat(embs, dim=-1) if embs else cats.new_zeros(*item_ids.shape, 0, dtype=torch.float)

    def forward(
        self, user: Tensor, cand_ids: Tensor, content: Sequence[Tensor], targets: Tensor | None = None
    ) -> Tensor:
        """user [B, user_dim] (from `user_features`), cand_ids [B, N], content [B, N, dim_i] -> [B, N].

        targets [B, N] bool (training only; None: every candidate): the candidates that are training
        targets, marked known and subject to ID dropout; the others read ID rows as in evaluation."""
        tokens = [user[:, None, :].expand(-1, cand_ids.shape[1], -1)]
        if self.item_dim:
            if self.training:  # the exported graph swaps item_features for table rows: eval path only
                tokens.append(self._item_token(cand_ids, self._training_id_rows(cand_ids, targets)))
            else:
                tokens.append(self.item_features(cand_ids))
        tokens += list(content)
        if self.head is None:  # dot
            return (tokens[0] * tokens[1]).sum(-1)
        x = self.mixer(tokens) if self.mixer is not None else torch.cat(tokens, dim=-1)
        return self.head(x).squeeze(-1)

    def _training_id_rows(self, cand_ids: Tensor, targets: Tensor | None) -> Tensor:
        if targets is None:
            self.mark_known(cand_ids)
            return self._id_dropout(cand_ids)
        self.mark_known(cand_ids[targets])
        return torch.where(targets, self._id_dropout(cand_ids), self._id_rows(cand_ids))

    def _id_dropout(self, item_ids: Tensor) -> Tensor:
        """ID rows of training targets: their own, or the new-item row for a share `id_dropout`."""
        if self.id_dropout <= 0:
            return item_ids
        drop = torch.rand(item_ids.shape, device=item_ids.device) < self.id_dropout
        return item_ids.masked_fill(drop, NEW_ITEM)


def _all_gather_ids(ids: Tensor) -> Tensor:
    """Every rank's ids [M_r], concatenated; ragged sizes padded with NEW_ITEM (never marked known)."""
    world = dist.get_world_size()
    size = torch.tensor([ids.numel()], device=ids.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    padded = F.pad(ids, (0, int(max(s.item() for s in sizes)) - ids.numel()), value=NEW_ITEM)
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat(parts)
