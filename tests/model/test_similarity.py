import torch
import torch.nn.functional as F

from trainer.model.similarity import history_cosine, similarity_features

# Right-aligned: one padding slot, then three items (oldest first).
TARGET = torch.tensor([[2.0, 0.0]])
HISTORY = torch.tensor([[[0.0, 0.0], [3.0, 0.0], [0.0, 1.0], [-1.0, 0.0]]])
MASK = torch.tensor([[False, True, True, True]])


def test_cosines_by_hand_with_absent_positions_zero():
    assert history_cosine(TARGET, HISTORY, MASK).tolist() == [[0.0, 1.0, 0.0, -1.0]]


def test_recent_then_sorted_copy_by_hand():
    feats = similarity_features(TARGET, HISTORY, MASK, topk=2)
    assert feats.tolist() == [[0.0, -1.0, 1.0, 0.0]]  # two most recent; two largest


def test_absent_slots_sort_after_negative_cosines_and_short_histories_are_padded():
    feats = similarity_features(TARGET, HISTORY, MASK, topk=6)
    recent, ranked = feats[0, :6].tolist(), feats[0, 6:].tolist()
    assert recent == [0.0, 0.0, 0.0, 1.0, 0.0, -1.0]
    assert ranked == [1.0, 0.0, -1.0, 0.0, 0.0, 0.0]


def test_many_candidates_match_single_calls_and_cosine_matches_torch():
    gen = torch.Generator().manual_seed(0)
    target = torch.randn(3, 5, 8, generator=gen)
    history = torch.randn(3, 7, 8, generator=gen)
    mask = torch.rand(3, 7, generator=gen) < 0.5
    mask[0] = False
    many = similarity_features(target, history, mask, topk=4)
    assert many.shape == (3, 5, 8)
    for j in range(5):
        torch.testing.assert_close(similarity_features(target[:, j], history, mask, topk=4), many[:, j])
    expected = F.cosine_similarity(target[:, :, None, :], history[:, None, :, :], dim=-1) * mask[:, None, :]
    torch.testing.assert_close(history_cosine(target, history, mask), expected)
    for b in range(3):
        for j in range(5):
            present = expected[b, j][mask[b]].sort(descending=True).values[:4]
            ranked = torch.cat([present, torch.zeros(4 - present.numel())])
            torch.testing.assert_close(many[b, j, 4:], ranked)
            torch.testing.assert_close(many[b, j, :4], expected[b, j, -4:])
    assert torch.equal(many[0], torch.zeros(5, 8))


def test_sorted_copy_is_differentiable_and_ignores_absent_positions():
    gen = torch.Generator().manual_seed(1)
    history = torch.randn(2, 5, 4, generator=gen, requires_grad=True)
    mask = torch.tensor([[False, False, True, True, True], [False, False, False, False, True]])
    similarity_features(torch.randn(2, 4, generator=gen), history, mask, topk=3).sum().backward()
    assert torch.isfinite(history.grad).all()
    assert torch.equal(history.grad[~mask], torch.zeros(6, 4))
    assert (history.grad[mask] != 0).any(-1).all()
