import pytest
import torch

from common.errors import MMRankError
from trainer.model.config import RankerConfig
from trainer.model.ranker import NEW_ITEM, Ranker, RankMixerLayer, token_mix

NUM_ITEMS, NUM_USERS = 9, 5
ITEM_CATS = torch.tensor([[0, 0], [1, 2], [2, 1], [3, 0], [1, 1], [2, 2], [3, 1], [1, 0], [2, 2], [3, 3]])


def _ranker(mixer: str = "mlp", use_item_id: bool = True) -> Ranker:
    torch.manual_seed(0)
    cfg = RankerConfig(
        id_dim=4, hidden=(16,), mixer=mixer, token_dim=8, mixer_layers=2, use_item_id=use_item_id
    )
    return Ranker(cfg, NUM_USERS, NUM_ITEMS, ITEM_CATS, (4, 4), (3,), content_dims=[6, 2]).eval()


def _inputs(n: int = 3):
    gen = torch.Generator().manual_seed(1)
    user_id = torch.tensor([1, 5])
    user_feats = torch.tensor([[2], [0]])
    cand = torch.randint(1, NUM_ITEMS + 1, (2, n), generator=gen)
    content = [torch.randn(2, n, 6, generator=gen), torch.randn(2, n, 2, generator=gen)]
    return user_id, user_feats, cand, content


@pytest.mark.parametrize("mixer", ["mlp", "rankmixer"])
def test_logits_shape_candidate_independence_and_gradients(mixer):
    ranker = _ranker(mixer)
    user_id, user_feats, cand, content = _inputs()
    user = ranker.user_features(user_id, user_feats)
    assert user.shape == (2, ranker.user_dim) == (2, 8)
    logits = ranker(user, cand, content)
    assert logits.shape == (2, 3)
    for j in range(3):
        single = ranker(user, cand[:, j : j + 1], [c[:, j : j + 1] for c in content])
        torch.testing.assert_close(single[:, 0], logits[:, j])
    logits.sum().backward()
    for name, p in ranker.named_parameters():
        assert p.grad is not None, name


def test_item_features_look_up_categoricals_from_ids():
    ranker = _ranker()
    ranker.mark_known(torch.tensor([3, 9, 1]))
    ids = torch.tensor([[3, 0], [9, 1]])
    feats = ranker.item_features(ids)
    assert feats.shape == (2, 2, 12) and ranker.item_dim == 12
    torch.testing.assert_close(feats[1, 0, :4], ranker.item_emb.weight[9])
    torch.testing.assert_close(feats[1, 0, 4:8], ranker.cat_embs[0].weight[3])
    torch.testing.assert_close(feats[1, 0, 8:], ranker.cat_embs[1].weight[3])
    assert _ranker(use_item_id=False).item_dim == 8


def test_token_mix_by_hand():
    x = torch.arange(8.0).reshape(2, 4)  # tokens a = 0..3, b = 4..7, two heads of width 2
    assert token_mix(x, 2).tolist() == [[0.0, 1.0, 4.0, 5.0], [2.0, 3.0, 6.0, 7.0]]
    layer = RankMixerLayer(tokens=2, width=4, dropout=0.0)
    assert layer(torch.randn(3, 5, 2, 4)).shape == (3, 5, 2, 4)


def test_per_token_ffn_has_its_own_weights():
    torch.manual_seed(0)
    layer = RankMixerLayer(tokens=2, width=4, dropout=0.0)
    x = torch.randn(1, 2, 4)
    out = layer(x)
    with torch.no_grad():
        layer.w1[1].zero_()
        layer.b1[1].zero_()
        layer.w2[1].zero_()
    changed = layer(x)
    torch.testing.assert_close(changed[:, 0], out[:, 0])
    assert not torch.allclose(changed[:, 1], out[:, 1])


def test_bad_configuration_is_named():
    cfg = RankerConfig(mixer="transformer")
    with pytest.raises(MMRankError, match="unknown ranker mixer"):
        Ranker(cfg, NUM_USERS, NUM_ITEMS, ITEM_CATS, (4, 4), (), [])
    with pytest.raises(MMRankError, match="item_cats has shape"):
        Ranker(RankerConfig(), NUM_USERS, NUM_ITEMS, ITEM_CATS[:5], (4, 4), (), [])


def test_items_never_trained_on_share_the_new_item_row_and_keep_their_categoricals():
    ranker = _ranker().train()
    assert torch.count_nonzero(ranker.item_emb.weight[NEW_ITEM]) == 0  # a neutral start
    user = ranker.user_features(torch.tensor([1]), torch.tensor([[2]]))
    ranker(user, torch.tensor([[3, 5]]), [torch.zeros(1, 2, 6), torch.zeros(1, 2, 2)])
    assert ranker.item_known.nonzero().flatten().tolist() == [3, 5]
    ranker.eval()
    feats = ranker.item_features(torch.tensor([3, 4, 9, 0]))
    torch.testing.assert_close(feats[0, :4], ranker.item_emb.weight[3])
    for row in (1, 2, 3):  # cold items 4, 9 and padding all read row 0
        torch.testing.assert_close(feats[row, :4], ranker.item_emb.weight[NEW_ITEM])
    torch.testing.assert_close(feats[2, 4:8], ranker.cat_embs[0].weight[3])  # item 9's own category


def test_known_items_travel_in_the_state_dict_and_are_required_there():
    ranker = _ranker()
    ranker.mark_known(torch.tensor([2, 7]))
    fresh = _ranker()
    fresh.load_state_dict(ranker.state_dict())
    assert fresh.item_known.nonzero().flatten().tolist() == [2, 7]
    without = {k: v for k, v in ranker.state_dict().items() if k != "item_known"}
    with pytest.raises(RuntimeError, match='Missing key.*"item_known"'):
        fresh.load_state_dict(without)


def test_id_dropout_sends_a_share_of_training_ids_to_the_new_item_row():
    cfg = RankerConfig(id_dim=4, hidden=(8,), item_id_dropout=0.5)
    ranker = Ranker(cfg, NUM_USERS, NUM_ITEMS, ITEM_CATS, (4, 4), (3,), content_dims=[])
    torch.manual_seed(0)
    ids = torch.randint(1, NUM_ITEMS + 1, (4000,))
    share = (ranker._id_dropout(ids) == NEW_ITEM).float().mean().item()
    assert abs(share - 0.5) < 0.05
    with pytest.raises(MMRankError, match="item_id_dropout"):
        Ranker(RankerConfig(item_id_dropout=1.0), NUM_USERS, NUM_ITEMS, ITEM_CATS, (4, 4), (3,), [])


def test_dot_mixer_is_matrix_factorisation_of_id_embeddings():
    cfg = RankerConfig(id_dim=4, mixer="dot", item_id_dropout=0.0)
    ranker = Ranker(cfg, NUM_USERS, NUM_ITEMS, ITEM_CATS, (4, 4), (3,), content_dims=[]).eval()
    ranker.mark_known(torch.arange(1, NUM_ITEMS + 1))
    assert ranker.user_dim == ranker.item_dim == 4  # no categoricals, no user features
    user = ranker.user_features(torch.tensor([2]), torch.tensor([[1]]))
    logits = ranker(user, torch.tensor([[4, 6]]), [])
    expected = ranker.item_emb.weight[[4, 6]] @ ranker.user_emb.weight[2]
    torch.testing.assert_close(logits[0], expected)
    with pytest.raises(MMRankError, match="dot"):
        Ranker(cfg, NUM_USERS, NUM_ITEMS, ITEM_CATS, (4, 4), (3,), content_dims=[6])
