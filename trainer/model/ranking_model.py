"""The composed EM3 + LEMUR ranking model: content tower, memory bank, user interest, ranker, aux losses.

`score` is the serving path, a pure function of tensors for N candidates sharing one history; the
exporter wraps it as the ONNX 'ranking' graph and `forward` calls it with N = 1, so exported and
training scores are the same computation. `item_vectors` gives the exported item table.

Where content vectors come from (docs/design.md, "Memory bank"):
- Targets in training: the content tower. With a memory bank and a trainable encoder (LEMUR), only a
  share p (`content.sample_p`) of the batch's distinct target items runs the encoder and a share
  q <= p (`content.sample_q`, of all items) back-propagates; the rest read the bank. Items the bank has
  never seen are encoded anyway (a bank default would make a poor target), with gradient only if drawn
  into q. Every freshly encoded vector is written to the bank (all-gathered under DDP).
- BPR's sampled negatives (`forward(batch, negatives)`) are scored in the same pass as the targets, as
  a second candidate sharing the user and history: one forward and one backward through DDP, the step
  counted once. Their content comes the targets' way (p/q sampling, and fresh vectors written to the
  bank with this step's stamp: LEMUR writes every vector the step encoded, and a history read of the
  item then gets its latest encoding), but they are not training targets to the ranker: not marked
  known, no ID dropout (`Ranker.forward`).
- Histories in training: with a bank, bank reads (no encoder on history items, except ids never
  written, which the tower encodes without gradient: the value eval and the exported table give them)
  with the dedup join putting this step's fresh vectors, gradient included, in place; without a bank, the tower encodes every distinct history item (EM3, and the "re-encode every
  history item" baseline of the bank benchmark).
- In eval, targets and histories use `item_vectors` (the bank where present, else the tower), exactly
  what the exported item table holds, so eval scores equal served scores.

Bank statistics in `stats` (training only): target coverage is measured before this step's write
(what the bank already knew), history coverage after it (positions served a real vector rather than
the default), staleness = mean cos(vector now, vector at the previous write) over the overwritten items
the `StalenessProbe` follows, both encoded in eval mode, so it measures how far the encoder moved and
not dropout noise (two training-mode encodings of unchanged weights are not the same vector).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from common.errors import MMRankError
from trainer.data.batch import Batch
from trainer.data.schema import PAD_ID
from trainer.losses import cic_loss, sqdc_loss
from trainer.model.attention import set_attention_impl
from trainer.model.config import ModelConfig
from trainer.model.content_tower import ContentTower
from trainer.model.decoder import CrossAttentionDecoder
from trainer.model.fusion_variants import masked_mean
from trainer.model.memory_bank import MemoryBank, dedup_join
from trainer.model.projections import Modalities
from trainer.model.ranker import Ranker
from trainer.model.similarity import similarity_features
from trainer.model.target_attention import TargetAttention


@dataclass
class ModelSchema:
    """What the model needs to know about the dataset: sizes, lookup tables and item features."""

    num_items: int
    num_users: int
    item_cats: Tensor  # [num_items + 1, C] int64 item categoricals, 0 = unknown
    item_cat_cards: tuple[int, ...]  # cardinality of each item categorical (ids 0..card-1)
    user_feat_cards: tuple[int, ...]  # cardinality of each user feature
    modalities: Modalities  # content tower inputs, row i = item i
    tokens: tuple[Tensor, Tensor] | None = None  # MiniLM token ids + mask per item (trainable encoder)


@dataclass
class ModelOutput:
    logits: Tensor  # [B]
    losses: dict[str, Tensor] = field(default_factory=dict)  # weighted auxiliary terms: "cic", "sqdc"
    stats: dict[str, float] = field(default_factory=dict)  # bank staleness / coverage, sampling shares
    negative_logits: Tensor | None = None  # [B], when forward was given sampled negatives


def uses_content(cfg: ModelConfig) -> bool:
    """Whether the model builds a content tower: some content feature or content loss is on."""
    rk, ls = cfg.ranker, cfg.loss
    return rk.use_content_item or rk.use_content_user or ls.cic_alpha > 0 or ls.sqdc_lambda > 0


def content_feature_dims(cfg: ModelConfig) -> list[int]:
    """Widths of the content features `score` hands the ranker, in its order: c; u, long-history u,
    decoder output, similarity features."""
    d, it = cfg.content.d, cfg.interest
    dims = [d] if cfg.ranker.use_content_item else []
    if cfg.ranker.use_content_user:
        dims += [d] * (1 + int(it.long_len > 0))
        dims += [it.decoder_queries * d] if it.decoder_layers > 0 else []
        dims += [2 * it.similarity_topk] if it.similarity_topk > 0 else []
    return dims


class RankingModel(nn.Module):
    def __init__(self, cfg: ModelConfig, schema: ModelSchema):
        super().__init__()
        self.cfg, self.schema = cfg, schema
        d, it, rk, ls = cfg.content.d, cfg.interest, cfg.ranker, cfg.loss
        has_content = uses_content(cfg)
        if it.memory_bank and not has_content:
            raise MMRankError(
                "interest.memory_bank needs content features (ranker.use_content_* or a content loss)"
            )
        if not 0.0 <= cfg.content.sample_q <= cfg.content.sample_p <= 1.0:
            raise MMRankError(
                f"content.sample_q ({cfg.content.sample_q}) must lie in [0, content.sample_p ({cfg.content.sample_p})] "
                "and sample_p in [0, 1]"
            )
        self.tower = ContentTower(cfg.content, schema.modalities, schema.tokens) if has_content else None
        self.bank = MemoryBank(schema.num_items, d) if it.memory_bank else None
        self.register_buffer("train_steps", torch.zeros((), dtype=torch.int64))

        user_side = rk.use_content_user
        self.interest = (
            TargetAttention(d, it.attention_heads, it.attention_impl)
            if user_side and it.target_attention
            else None
        )
        self.long_interest = (
            TargetAttention(d, it.attention_heads, it.attention_impl)
            if user_side and it.target_attention and it.long_len > 0
            else None
        )
        self.ranker = Ranker(
            rk,
            schema.num_users,
            schema.num_items,
            schema.item_cats,
            schema.item_cat_cards,
            schema.user_feat_cards,
            content_feature_dims(cfg),
        )
        self.decoder = (
            CrossAttentionDecoder(
                d,
                self.ranker.user_dim + d,
                it.decoder_queries,
                it.decoder_layers,
                it.decoder_heads,
                rk.dropout,
                it.attention_impl,
            )
            if user_side and it.decoder_layers > 0
            else None
        )
        if ls.cic_alpha > 0 and not self.ranker.item_dim:
            raise MMRankError("loss.cic_alpha > 0 needs item ID or item categorical embeddings")
        self.cic_content = nn.Linear(d, ls.cic_dim) if ls.cic_alpha > 0 else None
        self.cic_ids = nn.Linear(self.ranker.item_dim, ls.cic_dim) if ls.cic_alpha > 0 else None
        self.sqdc_query = nn.Linear(self.ranker.user_dim + d, d) if ls.sqdc_lambda > 0 else None
        set_attention_impl(self, it.attention_impl)  # the fusion's attention too: one switch for all

    # ---- serving path -------------------------------------------------------------------------------
    def score(
        self,
        user_id: Tensor,
        user_feats: Tensor,
        cand_ids: Tensor,
        cand_c: Tensor | None = None,
        hist_c: Tensor | None = None,
        hist_mask: Tensor | None = None,
        long_c: Tensor | None = None,
        long_mask: Tensor | None = None,
        *,
        targets: Tensor | None = None,
    ) -> Tensor:
        """Logits [B, N] for candidates cand_ids [B, N] with content cand_c [B, N, d], sharing the
        history hist_c [B, L, d] / hist_mask [B, L] (and long_c / long_mask when interest.long_len > 0).
        Content arguments may be None for a model without content features. `targets`: training
        only, see `Ranker.forward`."""
        user = self.ranker.user_features(user_id, user_feats)
        content = [cand_c] if self.cfg.ranker.use_content_item else []
        if self.cfg.ranker.use_content_user:
            it = self.cfg.interest
            long = it.long_len > 0
            # LEMUR's decoder and cosine features are its long-sequence modules: they read the long
            # history where there is one, the short one otherwise. The cosine features come with the
            # target attention over the same sequence (one pass over it with the fused kernel).
            interest, similarity = self._interest_and_similarity(
                self.interest, cand_c, hist_c, hist_mask, 0 if long else it.similarity_topk
            )
            content.append(interest)
            if long:
                long_interest, similarity = self._interest_and_similarity(
                    self.long_interest, cand_c, long_c, long_mask, it.similarity_topk
                )
                content.append(long_interest)
            seq_c, seq_mask = (long_c, long_mask) if long else (hist_c, hist_mask)
            if self.decoder is not None:
                context = torch.cat([user[:, None, :].expand(-1, cand_c.shape[1], -1), cand_c], dim=-1)
                content.append(self.decoder(context, seq_c, seq_mask))
            if similarity is not None:
                content.append(similarity)
        return self.ranker(user, cand_ids, content, targets)

    def _interest_and_similarity(
        self, attention: TargetAttention | None, cand_c: Tensor, hist: Tensor, mask: Tensor, topk: int
    ) -> tuple[Tensor, Tensor | None]:
        """u over a history and LEMUR's similarity features over it (None when topk is 0); target
        attention computes both in one pass over the history when its implementation is fused."""
        if attention is not None and topk > 0:
            return attention.with_similarity(cand_c, hist, mask, topk)
        similarity = similarity_features(cand_c, hist, mask, topk) if topk > 0 else None
        return self._interest(attention, cand_c, hist, mask), similarity

    @staticmethod
    def _interest(attention: TargetAttention | None, cand_c: Tensor, hist: Tensor, mask: Tensor) -> Tensor:
        """Target attention, or the masked mean of the history when target attention is off."""
        if attention is not None:
            return attention(cand_c, hist, mask)
        return masked_mean(hist, mask)[:, None, :].expand_as(cand_c)

    def item_vectors(self, ids: Tensor) -> Tensor:
        """Content vectors [..., d] for item ids [...]: the bank value where present, else the tower's."""
        if self.tower is None:
            raise MMRankError("this model has no content tower (no content features or content losses)")
        if self.bank is None:
            return self.tower(ids)
        vecs = self.bank.vectors[ids]
        missing = ~self.bank.present[ids] & (ids != PAD_ID)
        if bool(missing.any()):
            vecs = vecs.index_put((missing,), self.tower(ids[missing]).to(vecs.dtype))
        return vecs

    # ---- training path ------------------------------------------------------------------------------
    def forward(self, batch: Batch, negatives: Tensor | None = None) -> ModelOutput:
        """Logits of the batch's targets; with negatives [B] (one sampled item per row, BPR) also theirs
        in `negative_logits`, scored as a second candidate of the same row."""
        self._check(batch, negatives)
        cand_ids = batch.item_id[:, None] if negatives is None else torch.stack([batch.item_id, negatives], 1)
        targets = (
            None if negatives is None else torch.arange(2, device=cand_ids.device).eq(0).expand_as(cand_ids)
        )
        stats: dict[str, float] = {}
        columns, c = [None], None
        fresh_ids = fresh_vecs = hist_c = long_c = None
        if self.tower is not None:
            columns, fresh_ids, fresh_vecs = self._target_content(cand_ids, stats)
            c = torch.stack(columns, 1)
            histories = [("history", batch.hist_ids, batch.hist_mask)]
            if self.cfg.interest.long_len > 0:
                histories.append(("long_history", batch.long_hist_ids, batch.long_hist_mask))
            hist_c, *long = self._history_content(histories, fresh_ids, fresh_vecs, stats)
            long_c = long[0] if long else None
        # LEMUR Table 5 stop-gradient: the ranker sees the content vectors as constants, while the
        # auxiliary losses (SQDC) still train the encoder through them.
        sg = _detach if self.cfg.content.stop_gradient else _same
        logits = self.score(
            batch.user_id,
            batch.user_feats,
            cand_ids,
            sg(c),
            sg(hist_c),
            batch.hist_mask,
            sg(long_c),
            batch.long_hist_mask,
            targets=targets,
        )
        if self.training:
            self.train_steps += 1
        negative_logits = None if negatives is None else logits[:, 1]
        return ModelOutput(logits[:, 0], self._aux_losses(batch, columns[0], hist_c), stats, negative_logits)

    def _target_content(self, ids: Tensor, stats: dict[str, float]) -> tuple[list[Tensor], Tensor, Tensor]:
        """Vectors [B, d] of each column of the candidates ids [B, N] (column 0: the batch's targets, then
        sampled negatives) and the (distinct ids, vectors) freshly encoded in this step.

        One gather per column, stacked by the caller: with N = 1 the autograd graph, and so the order in
        which gradients are summed, is that of a model without negatives."""
        empty = ids.new_zeros(0)
        if not self.training:
            vecs = self.item_vectors(ids)
            return list(vecs.unbind(1)), empty, ids.new_zeros(0, self.cfg.content.d, dtype=torch.float)
        unique, inverse = torch.unique(ids, return_inverse=True)
        if self.bank is None:
            vecs = self.tower(unique)
            return [vecs[col] for col in inverse.unbind(1)], unique, vecs
        stats["bank/target_coverage"] = self.bank.coverage(ids[:, 0]).item()
        if self.tower.trainable_encoder:
            vecs, fresh = self._sampled_encode(unique, stats)
        else:
            vecs, fresh = self.tower(unique), torch.ones_like(unique, dtype=torch.bool)
        self.bank.all_gather_write(unique[fresh], vecs[fresh], int(self.train_steps))
        staleness = self.bank.probe.all_gather_update(*self._probe(unique[fresh]))
        if not torch.isnan(staleness):
            stats["bank/staleness"] = staleness.item()
        return [vecs[col] for col in inverse.unbind(1)], unique[fresh], vecs[fresh]

    @torch.no_grad()
    def _probe(self, fresh_ids: Tensor) -> tuple[Tensor, Tensor]:
        """The fresh ids the staleness probe follows and their eval-mode (dropout-free) vectors."""
        ids = fresh_ids[self.bank.probe.probed(fresh_ids)]
        with _eval_mode(self.tower):
            return ids, self.tower(ids)

    def _sampled_encode(self, unique: Tensor, stats: dict[str, float]) -> tuple[Tensor, Tensor]:
        """LEMUR p/q sampling over distinct target ids: vectors [U, d] and the freshly encoded mask [U]."""
        r = torch.rand(unique.shape, device=unique.device)
        grad = r < self.cfg.content.sample_q
        fresh = (r < self.cfg.content.sample_p) | ~self.bank.present[unique]
        vecs = self.bank.read(unique)
        no_grad_idx = (fresh & ~grad).nonzero().squeeze(1)
        grad_idx = grad.nonzero().squeeze(1)
        if no_grad_idx.numel():
            with torch.no_grad():
                encoded = self.tower(unique[no_grad_idx])
            vecs = vecs.index_put((no_grad_idx,), encoded.to(vecs.dtype))
        if grad_idx.numel():
            vecs = vecs.index_put((grad_idx,), self.tower(unique[grad_idx]).to(vecs.dtype))
        stats["bank/encoded_share"] = fresh.float().mean().item()
        stats["bank/grad_share"] = grad.float().mean().item()
        return vecs, fresh

    def _history_content(
        self,
        histories: list[tuple[str, Tensor, Tensor]],
        fresh_ids: Tensor,
        fresh_vecs: Tensor,
        stats: dict[str, float],
    ) -> list[Tensor]:
        """Content vectors [B, L, d] of each (name, ids [B, L], mask [B, L]) history of the batch.

        All histories go through one tower call: the short history is mostly inside the long one, and
        encoded separately an item the bank lacks would run the encoder twice in the same step.
        """
        flat = torch.cat([ids.reshape(-1) for _, ids, _ in histories])
        reads_bank = self.bank is not None and self.training
        if reads_bank:
            for name, ids, mask in histories:
                stats[f"bank/{name}_coverage"] = self.bank.coverage(ids, mask).item()
            with torch.no_grad():  # bank reads are constants; so are the encodings of never-written ids
                vecs = self.item_vectors(flat)
        elif self.bank is None:
            vecs = self.tower(flat)  # the tower encodes each distinct id once
        else:
            vecs = self.item_vectors(flat)
        parts = vecs.split([ids.numel() for _, ids, _ in histories])
        out = [part.reshape(*ids.shape, -1) for part, (_, ids, _) in zip(parts, histories, strict=True)]
        if not reads_bank:
            return out
        return [
            dedup_join(ids, part, fresh_ids, fresh_vecs)
            for part, (_, ids, _) in zip(out, histories, strict=True)
        ]

    def _aux_losses(self, batch: Batch, c: Tensor | None, hist_c: Tensor | None) -> dict[str, Tensor]:
        ls, losses = self.cfg.loss, {}
        if self.cic_content is not None:
            ids = self.cic_ids(self.ranker.item_features(batch.item_id))
            losses["cic"] = ls.cic_alpha * cic_loss(self.cic_content(c), ids, batch.item_id, ls.cic_tau)
        if self.sqdc_query is not None:
            user = self.ranker.user_features(batch.user_id, batch.user_feats)
            query = self.sqdc_query(torch.cat([user, masked_mean(hist_c, batch.hist_mask)], dim=-1))
            losses["sqdc"] = ls.sqdc_lambda * sqdc_loss(
                query, c, batch.label, batch.request_id, ls.sqdc_scale, ls.sqdc_request_mask
            )
        return losses

    def _check(self, batch: Batch, negatives: Tensor | None = None) -> None:
        """The Batch contract, with errors naming the field (torch's own errors would not)."""
        b = len(batch)
        if negatives is not None:
            if tuple(negatives.shape) != (b,):
                raise MMRankError(f"negatives has shape {tuple(negatives.shape)}, expected ({b},)")
            _check_range("negatives", negatives, self.schema.num_items)
        for name in ("user_id", "label", "request_id"):
            if tuple(getattr(batch, name).shape) != (b,):
                raise MMRankError(
                    f"batch.{name} has shape {tuple(getattr(batch, name).shape)}, expected ({b},)"
                )
        if tuple(batch.user_feats.shape) != (b, len(self.schema.user_feat_cards)):
            raise MMRankError(
                f"batch.user_feats has shape {tuple(batch.user_feats.shape)}, expected ({b}, {len(self.schema.user_feat_cards)})"
            )
        histories = [("hist", batch.hist_ids, batch.hist_mask)]
        if self.cfg.interest.long_len > 0:
            if batch.long_hist_ids is None or batch.long_hist_mask is None:
                raise MMRankError("interest.long_len > 0 but the batch has no long_hist_ids / long_hist_mask")
            histories.append(("long_hist", batch.long_hist_ids, batch.long_hist_mask))
        for name, ids, mask in histories:
            if ids.dim() != 2 or ids.shape[0] != b or mask.shape != ids.shape:
                raise MMRankError(
                    f"batch.{name}_ids {tuple(ids.shape)} and batch.{name}_mask {tuple(mask.shape)} must both be [{b}, L]"
                )
            _check_range(f"batch.{name}_ids", ids, self.schema.num_items)
        _check_range("batch.item_id", batch.item_id, self.schema.num_items)
        _check_range("batch.user_id", batch.user_id, self.schema.num_users)
        for i, card in enumerate(self.schema.user_feat_cards):
            _check_range(f"batch.user_feats[:, {i}]", batch.user_feats[:, i], card - 1)

    # ---- training utilities -------------------------------------------------------------------------
    def start_lora_phase(self) -> None:
        """EM3 phase 2: freeze the content tower and add LoRA adapters of rank interest.lora_rank.
        Rebuild the optimizer afterwards (`param_groups` lists only trainable parameters)."""
        if self.tower is None:
            raise MMRankError("start_lora_phase: this model has no content tower")
        if self.cfg.interest.lora_rank <= 0:
            raise MMRankError("start_lora_phase needs interest.lora_rank > 0")
        self.tower.enable_lora(self.cfg.interest.lora_rank)

    def param_groups(self, lr_content: float, lr_ranker: float, weight_decay: float) -> list[dict]:
        """AdamW groups: content tower vs the rest, each split into decayed (matrices) and not decayed
        (biases, norms, embedding tables: decoupled decay would shrink rarely seen ID rows every step).
        Frozen parameters are left out."""
        tower = {id(p) for p in self.tower.parameters()} if self.tower is not None else set()
        embeddings = {id(m.weight) for m in self.modules() if isinstance(m, nn.Embedding)}
        groups: dict[tuple[str, bool], list[nn.Parameter]] = {}
        for p in self.parameters():
            if p.requires_grad:
                part = "content" if id(p) in tower else "ranker"
                decay = p.dim() >= 2 and id(p) not in embeddings
                groups.setdefault((part, decay), []).append(p)
        lrs = {"content": lr_content, "ranker": lr_ranker}
        return [
            {
                "name": f"{part}/{'decay' if decay else 'no_decay'}",
                "params": params,
                "lr": lrs[part],
                "weight_decay": weight_decay if decay else 0.0,
            }
            for (part, decay), params in sorted(groups.items())
        ]


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(training)


def _detach(x: Tensor | None) -> Tensor | None:
    return None if x is None else x.detach()


def _same(x: Tensor | None) -> Tensor | None:
    return x


def _check_range(name: str, ids: Tensor, high: int) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) > high):
        raise MMRankError(f"{name} has ids in [{int(ids.min())}, {int(ids.max())}], expected [0, {high}]")
