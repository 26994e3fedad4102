import math

import pytest
import torch

from trainer.losses import bce, cic_loss, emb_loss, first_occurrence, sqdc_loss

R = 1 / math.sqrt(2)


def _nll(pos: float, logits: list[float]) -> float:
    return -math.log(math.exp(pos) / sum(math.exp(x) for x in logits))


def test_bce_by_hand():
    logits, labels = torch.tensor([0.0, 2.0, -1.0]), torch.tensor([1.0, 0.0, 0.0])
    sig = [1 / (1 + math.exp(-x)) for x in (0.0, 2.0, -1.0)]
    expected = -(math.log(sig[0]) + math.log(1 - sig[1]) + math.log(1 - sig[2])) / 3
    assert bce(logits, labels).item() == pytest.approx(expected, rel=1e-6)


def test_first_occurrence_keeps_batch_order():
    assert first_occurrence(torch.tensor([12, 10, 12, 11, 10])).tolist() == [0, 1, 3]


def test_cic_by_hand_with_a_repeated_item():
    # Items 10, 11, 10, 12: the second 10 (row 2) is dropped, so its huge vectors change nothing.
    content = torch.tensor([[1.0, 0.0], [0.0, 1.0], [5.0, -5.0], [1.0, 1.0]])
    ids = torch.tensor([[1.0, 0.0], [1.0, 1.0], [9.0, -9.0], [0.0, 1.0]])
    item_ids = torch.tensor([10, 11, 10, 12])
    tau = 0.5
    # cos(C_a, I_b) over the kept rows 0, 1, 3 (after L2 normalisation), divided by tau.
    s = [[1.0, R, 0.0], [0.0, R, 1.0], [R, 1.0, R]]
    s = [[x / tau for x in row] for row in s]
    c2i = sum(_nll(s[a][a], s[a]) for a in range(3)) / 3
    i2c = sum(_nll(s[b][b], [s[a][b] for a in range(3)]) for b in range(3)) / 3
    assert cic_loss(content, ids, item_ids, tau).item() == pytest.approx(0.5 * (c2i + i2c), rel=1e-6)


def test_cic_with_sampled_negatives_by_hand():
    # EM3's MMRec form: each item against `negatives` items drawn with replacement (itself allowed).
    gen = torch.Generator().manual_seed(0)
    content, ids = torch.randn(6, 3, generator=gen), torch.randn(6, 3, generator=gen)
    torch.manual_seed(4)
    loss = cic_loss(content, ids, torch.arange(6), 0.2, negatives=5)
    torch.manual_seed(4)
    drawn = torch.randint(0, 6, (6, 5))
    c = [x / x.norm() for x in content]
    i = [x / x.norm() for x in ids]
    c2i = i2c = 0.0
    for a in range(6):
        c2i += _nll(float(c[a] @ i[a]) / 0.2, [float(c[a] @ i[b]) / 0.2 for b in [a, *drawn[a].tolist()]])
        i2c += _nll(float(i[a] @ c[a]) / 0.2, [float(i[a] @ c[b]) / 0.2 for b in [a, *drawn[a].tolist()]])
    assert loss.item() == pytest.approx(0.5 * (c2i + i2c) / 6, rel=1e-5)


def test_emb_loss_is_mmrecs_unsquared_norm_over_the_batch():
    rows = (torch.tensor([[3.0, 4.0], [0.0, 0.0]]), torch.tensor([[1.0, 0.0], [0.0, 0.0]]))
    assert emb_loss(*rows).item() == pytest.approx((5.0 + 1.0) / 2)


Q = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [1.0, -1.0]])
D = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 1.0], [2.0, 0.0]])
LABELS = torch.tensor([1.0, 0.0, 1.0, 1.0])
REQUESTS = torch.tensor([7, 7, 8, 8])
T = 2.0
# cos(q_i, d_j), written out.
COS = [[1.0, R, 0.0, 1.0], [0.0, R, 1.0, 0.0], [R, 1.0, R, R], [R, 0.0, -R, R]]


def test_sqdc_with_request_mask_by_hand():
    # Clicked anchors 0, 2, 3; each drops the other sample of its request from the denominator.
    keep = {0: [0, 2, 3], 2: [0, 1, 2], 3: [0, 1, 3]}
    expected = sum(_nll(T * COS[i][i], [T * COS[i][j] for j in keep[i]]) for i in keep) / 3
    got = sqdc_loss(Q, D, LABELS, REQUESTS, scale=T, request_mask=True)
    assert got.item() == pytest.approx(expected, rel=1e-6)


def test_sqdc_without_request_mask_by_hand_differs():
    expected = sum(_nll(T * COS[i][i], [T * c for c in COS[i]]) for i in (0, 2, 3)) / 3
    unmasked = sqdc_loss(Q, D, LABELS, REQUESTS, scale=T, request_mask=False)
    assert unmasked.item() == pytest.approx(expected, rel=1e-6)
    masked = sqdc_loss(Q, D, LABELS, REQUESTS, scale=T, request_mask=True)
    assert masked.item() < unmasked.item()


def test_sqdc_without_clicks_is_zero_and_keeps_the_graph():
    q = Q.clone().requires_grad_()
    loss = sqdc_loss(q, D, torch.zeros(4), REQUESTS, scale=T)
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(q.grad, torch.zeros_like(Q))


def test_cic_and_sqdc_are_differentiable():
    gen = torch.Generator().manual_seed(0)
    content, ids = torch.randn(6, 4, generator=gen, requires_grad=True), torch.randn(6, 4, generator=gen)
    (cic_loss(content, ids, torch.tensor([1, 2, 3, 1, 4, 5]), 0.1)).backward()
    assert torch.isfinite(content.grad).all() and content.grad[3].abs().sum() == 0  # the repeat
    doc = torch.randn(6, 4, generator=gen, requires_grad=True)
    sqdc_loss(
        torch.randn(6, 4, generator=gen), doc, torch.ones(6), torch.tensor([1, 1, 1, 2, 2, 3])
    ).backward()
    assert torch.isfinite(doc.grad).all()
