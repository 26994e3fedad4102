import pytest
import torch

from common.errors import MMRankError
from trainer.data.batch import Batch
from trainer.losses import bce
from trainer.model.config import ContentConfig, InterestConfig, LossConfig, ModelConfig, RankerConfig
from trainer.model.ranking_model import ModelSchema, RankingModel

NUM_ITEMS, NUM_USERS = 12, 4


def _schema(tokens=None) -> ModelSchema:
    gen = torch.Generator().manual_seed(0)
    text = torch.randn(NUM_ITEMS + 1, 2, 12, generator=gen)
    text_mask = torch.ones(NUM_ITEMS + 1, 2, dtype=torch.bool)
    text_mask[::3, 1] = False
    image = torch.randn(NUM_ITEMS + 1, 1, 10, generator=gen)
    image_mask = torch.ones(NUM_ITEMS + 1, 1, dtype=torch.bool)
    image_mask[5] = False  # an item without a poster
    text_mask[0], image_mask[0] = False, False
    item_cats = torch.randint(1, 4, (NUM_ITEMS + 1, 2), generator=gen)
    item_cats[0] = 0
    return ModelSchema(
        num_items=NUM_ITEMS,
        num_users=NUM_USERS,
        item_cats=item_cats,
        item_cat_cards=(4, 4),
        user_feat_cards=(3, 2),
        modalities={"text": (text, text_mask), "image": (image, image_mask)},
        tokens=tokens,
    )


def _cfg(**overrides) -> ModelConfig:
    cfg = ModelConfig(
        content=ContentConfig(d=16, fusion_heads=4, dropout=0.0),
        interest=InterestConfig(short_len=5),
        ranker=RankerConfig(id_dim=4, hidden=(16,), dropout=0.0, token_dim=8),
        loss=LossConfig(cic_dim=8),
    )
    for path, value in overrides.items():
        part, name = path.split(".")
        setattr(getattr(cfg, part), name, value)
    return cfg


EM3 = {"interest.attention_heads": 2, "loss.cic_alpha": 0.1}
LEMUR = {
    "interest.memory_bank": True,
    "interest.decoder_layers": 1,
    "interest.decoder_heads": 2,
    "interest.similarity_topk": 3,
    "loss.sqdc_lambda": 0.5,
    "ranker.mixer": "rankmixer",
}
ID_ONLY = {"ranker.use_content_item": False, "ranker.use_content_user": False}
LONG = {"interest.long_len": 8, "interest.lora_rank": 2}


def _history(gen: torch.Generator, b: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.randint(0, length + 1, (b,), generator=gen)
    lengths[0] = 0  # a user without history
    lengths[1] = length
    mask = torch.arange(length)[None, :] >= (length - lengths)[:, None]
    ids = torch.randint(1, NUM_ITEMS + 1, (b, length), generator=gen) * mask
    return ids, mask


def _batch(seed: int = 0, b: int = 6, long_len: int = 0) -> Batch:
    gen = torch.Generator().manual_seed(seed)
    hist, mask = _history(gen, b, 5)
    long_hist, long_mask = _history(gen, b, long_len) if long_len else (None, None)
    return Batch(
        user_id=torch.randint(1, NUM_USERS + 1, (b,), generator=gen),
        item_id=torch.tensor([1, 2, 3, 2, 8, 9])[:b],  # 8: followed by the staleness probe
        label=torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0])[:b],
        request_id=torch.tensor([1, 1, 1, 2, 2, 3])[:b],
        user_feats=torch.stack(
            [torch.randint(0, 3, (b,), generator=gen), torch.randint(0, 2, (b,), generator=gen)], 1
        ),
        hist_ids=hist,
        hist_mask=mask,
        long_hist_ids=long_hist,
        long_hist_mask=long_mask,
    )


def _model(overrides: dict, schema: ModelSchema | None = None) -> RankingModel:
    torch.manual_seed(0)
    return RankingModel(_cfg(**overrides), schema or _schema())


def _train_step(model: RankingModel, batch: Batch):
    model.train()
    out = model(batch)
    loss = bce(out.logits, batch.label) + sum(out.losses.values())
    loss.backward()
    return out, loss


def _grads(module: torch.nn.Module) -> dict[str, torch.Tensor | None]:
    return {name: p.grad for name, p in module.named_parameters()}


def test_em3_like_frozen_tower_target_attention_cic():
    model = _model(EM3)
    assert model.bank is None and model.decoder is None and not model.tower.trainable_encoder
    out, loss = _train_step(model, _batch())
    assert out.logits.shape == (6,) and torch.isfinite(loss)
    assert set(out.losses) == {"cic"} and out.stats == {}
    for name, grad in _grads(model).items():
        assert grad is not None, name
    # The user without history still gets a finite score and its u is exactly zero.
    c = model.item_vectors(torch.tensor([[1]]))
    u = model.interest(c, torch.zeros(1, 5, 16), torch.zeros(1, 5, dtype=torch.bool))
    assert torch.equal(u, torch.zeros_like(u))


def test_lemur_like_bank_decoder_similarity_sqdc():
    model = _model(LEMUR)
    batch = _batch()
    out, _ = _train_step(model, batch)
    assert set(out.losses) == {"sqdc"}
    assert out.stats["bank/target_coverage"] == 0.0 and "bank/staleness" not in out.stats
    hist_ids = batch.hist_ids[batch.hist_mask]
    targets = set(batch.item_id.tolist())
    expected = sum(int(i) in targets for i in hist_ids.tolist()) / hist_ids.numel()
    assert out.stats["bank/history_coverage"] == pytest.approx(expected)
    assert model.bank.present[batch.item_id].all() and model.bank.present.sum() == len(targets)
    assert all(p.grad is not None for p in model.tower.parameters())

    before = model.bank.vectors.clone()
    out2, loss2 = _train_step(model, batch)
    assert out2.stats["bank/target_coverage"] == 1.0
    assert -1.0 <= out2.stats["bank/staleness"] <= 1.0 + 1e-6
    assert torch.isfinite(loss2)
    assert model.bank.written_step[batch.item_id].eq(1).all() and int(model.train_steps) == 2
    # The tower's weights did not change between the steps (no optimizer), so the cache is fresh.
    assert out2.stats["bank/staleness"] == pytest.approx(1.0, abs=1e-5)
    torch.testing.assert_close(model.bank.vectors, before)


def test_history_reads_the_bank_and_dedup_join_gives_fresh_items_gradient():
    model = _model(LEMUR)
    batch = _batch()
    _train_step(model, batch)
    model.train()
    stats: dict[str, float] = {}
    _, fresh_ids, fresh_vecs = model._target_content(batch.item_id[:, None], stats)
    hist_ids = torch.tensor([[0, 4, 2, 6, 2]])  # 2 was encoded this step, 4 and 6 were never written
    (hist,) = model._history_content([("history", hist_ids, hist_ids != 0)], fresh_ids, fresh_vecs, stats)
    params = [p for p in model.tower.parameters() if p.requires_grad]

    def tower_grad(position: int) -> float:
        grads = torch.autograd.grad(hist[0, position].sum(), params, retain_graph=True, allow_unused=True)
        return sum(0.0 if g is None else float(g.abs().sum()) for g in grads)

    assert tower_grad(2) > 0 and tower_grad(4) > 0  # the fresh vector of item 2, with its gradient
    assert tower_grad(1) == 0 and tower_grad(3) == 0  # never written: the tower's encoding, a constant
    assert not model.bank.present[4] and float(hist[0, 1].detach().abs().sum()) > 0  # encoded, not a default
    torch.testing.assert_close(hist[0, 2], model.bank.vectors[2])  # the same value the bank now holds
    assert torch.equal(hist[0, 0], torch.zeros(16))


def test_a_training_step_encodes_each_item_once(monkeypatch):
    """Targets, short and long history share one step's encodings: no item runs the tower twice in
    training mode (the staleness probe re-encodes the fresh target it follows, 8, in eval mode)."""
    model = _model({**LEMUR, "interest.long_len": 8})
    batch = _batch(long_len=8)
    short = set(batch.hist_ids[batch.hist_mask].tolist())
    long = set(batch.long_hist_ids[batch.long_hist_mask].tolist())
    targets = set(batch.item_id.tolist())
    assert (short & long) - targets  # items the bank lacks that both histories hold
    encoded, encode = {True: [], False: []}, model.tower._encode

    def record(ids):
        encoded[model.tower.training].append(ids.clone())
        return encode(ids)

    monkeypatch.setattr(model.tower, "_encode", record)
    _train_step(model, batch)
    ids = torch.cat(encoded[True])
    assert ids.numel() == ids.unique().numel()
    assert set(ids.tolist()) == targets | short | long  # the bank was empty: every item once
    assert torch.cat(encoded[False]).tolist() == [8]


MF = {**ID_ONLY, "ranker.mixer": "dot", "ranker.item_id_dropout": 0.0}


def test_bpr_negatives_are_scored_in_the_same_pass_without_becoming_known():
    """A review saw positives [1, 2, 3] with negatives [17, 14, 4] leave item_known = [1, 2, 3, 4, 14, 17]
    and train_steps = 2 after one step (the negatives ran a second training forward)."""
    model = _model(MF)
    batch = _batch(b=3)
    negatives = torch.tensor([11, 2, 4])  # 11 and 4 never trained on; 2 a positive of another row
    model.train()
    out = model(batch, negatives)
    assert model.ranker.item_known.nonzero().flatten().tolist() == [1, 2, 3]
    assert int(model.train_steps) == 1
    user = model.ranker.user_emb.weight[batch.user_id]
    rows = model.ranker.item_emb.weight
    torch.testing.assert_close(out.logits, (user * rows[batch.item_id]).sum(-1))
    # Cold negatives read the shared new-item row (zeros at the start), a known one its own row.
    torch.testing.assert_close(out.negative_logits, (user * rows[torch.tensor([0, 2, 0])]).sum(-1))
    with pytest.raises(MMRankError, match="negatives has shape"):
        model(batch, negatives[:2])
    with pytest.raises(MMRankError, match="negatives has ids"):
        model(batch, torch.tensor([1, 2, NUM_ITEMS + 1]))


def test_bpr_mf_scores_every_item_in_one_product_and_adds_mmrecs_l2():
    model = _model({**MF, "loss.l2_weight": 0.5})
    batch = _batch(b=3)
    model.train()
    out = model(batch, torch.tensor([4, 5, 6]))
    user, rows = model.ranker.user_emb.weight[batch.user_id], model.ranker.item_emb.weight
    known = torch.where(model.ranker.item_known[torch.tensor([4, 5, 6])], torch.tensor([4, 5, 6]), 0)
    expected = (user.norm() + rows[batch.item_id].norm() + rows[known].norm()) / 3
    torch.testing.assert_close(out.losses["l2"], 0.5 * expected)
    model.eval()
    cands = torch.arange(NUM_ITEMS + 1).expand(3, -1)
    with torch.no_grad():
        scored = model.score(batch.user_id, batch.user_feats, cands)
        torch.testing.assert_close(model.full_scores(batch.user_id), scored)
    assert _model(ID_ONLY).full_scores(batch.user_id) is None  # an MLP ranker scores candidate by candidate


def test_bpr_negatives_take_no_id_dropout():
    model = _model({**MF, "ranker.item_id_dropout": 0.9})
    batch = _batch()
    model.ranker.mark_known(torch.arange(1, NUM_ITEMS + 1))
    negatives = torch.tensor([5, 6, 8, 10, 11, 12])
    model.train()
    torch.manual_seed(0)
    out = model(batch, negatives)
    user = model.ranker.user_emb.weight[batch.user_id]
    torch.testing.assert_close(out.negative_logits, (user * model.ranker.item_emb.weight[negatives]).sum(-1))
    assert not torch.allclose(out.logits, (user * model.ranker.item_emb.weight[batch.item_id]).sum(-1))


def test_bpr_negatives_share_the_step_bank_write_and_tower_gradient():
    model = _model(LEMUR)
    batch = _batch()
    negatives = torch.tensor([4, 5, 6, 1, 8, 11])
    model.train()
    out = model(batch, negatives)
    assert int(model.train_steps) == 1 and out.negative_logits.shape == (6,)
    assert model.ranker.item_known.nonzero().flatten().tolist() == sorted(set(batch.item_id.tolist()))
    written = torch.cat([batch.item_id, negatives])
    assert model.bank.written_step[written].eq(0).all()
    assert model.bank.written_step.eq(0).sum() == written.unique().numel()
    assert out.stats["bank/target_coverage"] == 0.0 and set(out.losses) == {"sqdc"}
    params = [p for p in model.tower.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out.negative_logits.sum(), params, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    model(batch, negatives)
    assert int(model.train_steps) == 2 and model.bank.written_step[written].eq(1).all()


def test_staleness_measures_weight_changes_not_dropout():
    """The bank holds training-mode vectors: with dropout on, two writes of the same weights differ,
    which cos(fresh, cached) used to report as staleness. The probe compares eval-mode encodings."""
    model = _model({**LEMUR, "content.dropout": 0.1})  # the default fusion dropout
    batch = _batch()
    model.train()
    model(batch)
    cached = model.bank.vectors[batch.item_id].clone()
    out = model(batch)
    noise = torch.nn.functional.cosine_similarity(model.bank.vectors[batch.item_id], cached, dim=-1)
    assert noise.mean() < 0.99  # what the old measurement reported (0.95) with no weight changed
    assert out.stats["bank/staleness"] == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():
        for p in model.tower.parameters():
            p.add_(0.3 * torch.randn_like(p))
    assert model(batch).stats["bank/staleness"] < 0.99


def test_id_only_model_has_no_content_tower():
    model = _model(ID_ONLY)
    assert model.tower is None and model.bank is None
    out, loss = _train_step(model, _batch())
    assert torch.isfinite(loss) and out.losses == {}
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(MMRankError, match="no content tower"):
        model.item_vectors(torch.tensor([1]))
    with pytest.raises(MMRankError, match="needs content features"):
        _model({**ID_ONLY, "interest.memory_bank": True})


def test_long_history_then_lora_phase_freezes_the_tower_base():
    model = _model({**EM3, **LONG})
    batch = _batch(long_len=8)
    out, _ = _train_step(model, batch)
    assert model.long_interest is not None
    assert all(p.grad is not None for p in model.tower.parameters())
    base = {name for name, _ in model.tower.named_parameters()}
    model.zero_grad(set_to_none=True)
    model.start_lora_phase()
    groups = model.param_groups(lr_content=1e-4, lr_ranker=1e-3, weight_decay=0.01)
    content = [p for g in groups if g["name"].startswith("content") for p in g["params"]]
    lora = {name: p for name, p in model.tower.named_parameters() if "lora_" in name}
    assert lora and {id(p) for p in content} == {id(p) for p in lora.values()}
    _train_step(model, batch)
    for name, p in model.tower.named_parameters():
        if name in base:
            assert p.grad is None and not p.requires_grad, name
        else:
            assert p.grad is not None, name


def test_lora_phase_leaves_scores_unchanged_at_the_switch():
    model = _model({**EM3, **LONG})
    batch = _batch(long_len=8)
    model.eval()
    before = model(batch).logits
    model.start_lora_phase()
    torch.testing.assert_close(model(batch).logits, before)
    with pytest.raises(MMRankError, match="lora_rank > 0"):
        _model(EM3).start_lora_phase()


@pytest.mark.parametrize(
    "overrides", [EM3, LEMUR, ID_ONLY, {**EM3, **LONG}], ids=["em3", "lemur", "id", "long"]
)
def test_score_with_n_candidates_equals_forward(overrides):
    model = _model(overrides)
    long_len = overrides.get("interest.long_len", 0)
    batch = _batch(long_len=long_len)
    _train_step(model, batch)  # fills the bank where there is one
    model.eval()
    cand = torch.tensor([[1, 4, 2], [2, 11, 12], [3, 3, 5], [2, 1, 6], [7, 8, 10], [9, 12, 1]])
    has_content = model.tower is not None
    with torch.no_grad():
        vec = model.item_vectors if has_content else (lambda ids: None)
        scores = model.score(
            batch.user_id,
            batch.user_feats,
            cand,
            vec(cand),
            vec(batch.hist_ids),
            batch.hist_mask,
            vec(batch.long_hist_ids) if long_len else None,
            batch.long_hist_mask,
        )
        assert scores.shape == (6, 3)
        for j in range(3):
            batch.item_id = cand[:, j]
            torch.testing.assert_close(model(batch).logits, scores[:, j], atol=1e-5, rtol=1e-5)


def test_item_vectors_prefer_the_bank_and_encode_unwritten_items():
    model = _model(LEMUR)
    batch = _batch()
    _train_step(model, batch)
    model.eval()
    with torch.no_grad():
        ids = torch.tensor([1, 4, 0])  # written, never written, padding
        vecs = model.item_vectors(ids)
        torch.testing.assert_close(vecs[0], model.bank.vectors[1])
        torch.testing.assert_close(vecs[1], model.tower(torch.tensor([4]))[0])
        assert torch.equal(vecs[2], torch.zeros(16))


def test_param_groups_split_content_and_ranker_and_skip_decay_on_embeddings():
    model = _model(LEMUR)
    groups = model.param_groups(lr_content=1e-4, lr_ranker=1e-3, weight_decay=0.05)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"content/decay", "content/no_decay", "ranker/decay", "ranker/no_decay"}
    assert by_name["content/decay"]["lr"] == 1e-4 and by_name["ranker/decay"]["lr"] == 1e-3
    assert (
        by_name["ranker/no_decay"]["weight_decay"] == 0.0 and by_name["ranker/decay"]["weight_decay"] == 0.05
    )
    no_decay = {id(p) for p in by_name["ranker/no_decay"]["params"]}
    assert id(model.ranker.user_emb.weight) in no_decay
    listed = [id(p) for g in groups for p in g["params"]]
    assert sorted(listed) == sorted(id(p) for p in model.parameters() if p.requires_grad)
    torch.optim.AdamW(groups)


def test_bad_batches_and_configs_name_the_problem():
    model = _model(EM3)
    batch = _batch()
    batch.item_id = batch.item_id.clone()
    batch.item_id[2] = NUM_ITEMS + 1
    with pytest.raises(MMRankError, match="batch.item_id has ids"):
        model(batch)
    batch = _batch()
    batch.hist_mask = batch.hist_mask[:, :3]
    with pytest.raises(MMRankError, match="batch.hist_ids"):
        model(batch)
    batch = _batch()
    batch.user_feats = batch.user_feats[:, :1]
    with pytest.raises(MMRankError, match="batch.user_feats"):
        model(batch)
    with pytest.raises(MMRankError, match="long_hist_ids"):
        _model({**EM3, **LONG})(_batch())
    with pytest.raises(MMRankError, match="sample_q"):
        _model({"content.sample_p": 0.1, "content.sample_q": 0.2})
    with pytest.raises(MMRankError, match="cic_alpha"):
        _model({**EM3, "ranker.use_item_id": False}, _schema_without_cats())


def _schema_without_cats() -> ModelSchema:
    schema = _schema()
    schema.item_cats, schema.item_cat_cards = schema.item_cats[:, :0], ()
    return schema


@pytest.fixture(scope="module")
def trainable_model() -> RankingModel:
    gen = torch.Generator().manual_seed(3)
    input_ids = torch.randint(1000, 3000, (NUM_ITEMS + 1, 6), generator=gen)
    input_ids[:, 0] = 101
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0] = 0
    attention_mask[4:, 4:] = 0
    schema = _schema(tokens=(input_ids, attention_mask))
    overrides = {
        **LEMUR,
        "content.encoder_mode": "trainable",
        "content.trainable_layers": 1,
        "content.sample_p": 0.5,
        "content.sample_q": 0.25,
    }
    return _model(overrides, schema)


def test_trainable_encoder_p_q_sampling(trainable_model):
    model = trainable_model
    assert model.tower.trainable_encoder
    batch = _batch()
    out, _ = _train_step(model, batch)
    assert out.stats["bank/encoded_share"] == 1.0  # nothing was in the bank: everything is encoded
    assert 0.0 <= out.stats["bank/grad_share"] <= 1.0
    model.zero_grad(set_to_none=True)

    torch.manual_seed(11)
    model.train()
    stats: dict[str, float] = {}
    ids = torch.arange(1, NUM_ITEMS + 1)
    (c,), fresh_ids, fresh_vecs = model._target_content(ids[:, None], stats)
    assert stats["bank/grad_share"] <= stats["bank/encoded_share"]
    unwritten = set(range(1, NUM_ITEMS + 1)) - set(batch.item_id.tolist())
    assert unwritten <= set(fresh_ids.tolist())  # never-written items are always encoded
    cached = torch.tensor([i for i in ids.tolist() if i not in set(fresh_ids.tolist())])
    assert cached.numel() > 0  # p = 0.5 leaves some of the five written items to the bank
    torch.testing.assert_close(c[cached - 1], model.bank.vectors[cached])
    # Bank reads are constants: a loss on them alone reaches no encoder weight.
    if c[cached - 1].requires_grad:
        c[cached - 1].sum().backward()
    text = [p for n, p in model.tower.named_parameters() if n.startswith("text.")]
    assert text and all(p.grad is None or p.grad.abs().sum() == 0 for p in text)
    assert stats["bank/encoded_share"] == pytest.approx(fresh_ids.numel() / NUM_ITEMS)


@pytest.mark.parametrize(
    "overrides", [EM3, LEMUR, {**LEMUR, "interest.long_len": 8}], ids=["em3", "lemur", "lemur_long"]
)
def test_fused_attention_trains_like_sdpa(overrides):
    """The one switch: `attention_impl = "fused"` (on CPU, the custom ops' reference paths) gives the
    same logits, losses and gradients as SDPA for the whole model, fusion included."""
    from trainer.model.attention import set_attention_impl

    results = []
    for impl in ("sdpa", "fused"):
        model = _model(overrides)
        set_attention_impl(model, impl)
        torch.manual_seed(1)
        out, loss = _train_step(model, _batch(long_len=overrides.get("interest.long_len", 0)))
        grads = {k: torch.zeros(()) if g is None else g for k, g in _grads(model).items()}
        results.append((out.logits.detach(), loss.detach(), grads))
    torch.testing.assert_close(results[0][0], results[1][0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(results[0][1], results[1][1], atol=1e-5, rtol=1e-5)
    for name, grad in results[0][2].items():
        if "interest.key.bias" in name:  # cancels in the softmax: 0 in exact arithmetic, unused when fused
            continue
        torch.testing.assert_close(results[1][2][name], grad, atol=1e-5, rtol=1e-4, msg=name)


def test_decoder_and_similarity_read_the_long_sequence_when_there_is_one():
    model = _model({**LEMUR, "interest.long_len": 8, "interest.target_attention": False}).eval()
    gen = torch.Generator().manual_seed(3)
    user, feats, cand = torch.tensor([1]), torch.tensor([[1, 1]]), torch.tensor([[2, 3]])
    cand_c = torch.randn(1, 2, 16, generator=gen)
    long_c, long_mask = torch.randn(1, 8, 16, generator=gen), torch.ones(1, 8, dtype=torch.bool)
    short_mask = torch.ones(1, 5, dtype=torch.bool)
    seen = []
    model.decoder.register_forward_hook(lambda m, args, out: seen.append(args[1].shape[1]))
    with torch.no_grad():
        a = model.score(
            user, feats, cand, cand_c, torch.randn(1, 5, 16, generator=gen), short_mask, long_c, long_mask
        )
    assert seen == [8]  # the decoder attended over the long history
    # With target attention off the short history enters only through its masked mean: two short
    # histories with the same mean score the same, so decoder and similarity features ignore it.
    short = torch.randn(1, 5, 16, generator=gen)
    shifted = short + torch.tensor([1.0, -1.0, 0.0, 0.0, 0.0])[None, :, None]
    with torch.no_grad():
        b = model.score(user, feats, cand, cand_c, short, short_mask, long_c, long_mask)
        c = model.score(user, feats, cand, cand_c, shifted, short_mask, long_c, long_mask)
    torch.testing.assert_close(b, c)
    assert a.shape == (1, 2)
