import torch

from trainer.model.decoder import CrossAttentionDecoder


def _decoder(impl: str = "sdpa") -> CrossAttentionDecoder:
    torch.manual_seed(0)
    return CrossAttentionDecoder(d=8, context_dim=5, num_queries=3, layers=2, heads=2, impl=impl).eval()


def _inputs(n: int | None = None):
    gen = torch.Generator().manual_seed(1)
    context = torch.randn(4, 5, generator=gen) if n is None else torch.randn(4, n, 5, generator=gen)
    history = torch.randn(4, 7, 8, generator=gen)
    mask = torch.rand(4, 7, generator=gen) < 0.5
    mask[1] = False
    mask[2] = True
    return context, history, mask


def test_shapes_for_one_and_many_candidates():
    dec = _decoder()
    context, history, mask = _inputs()
    assert dec(context, history, mask).shape == (4, 24) == (4, dec.out_dim)
    context_n, _, _ = _inputs(n=6)
    assert dec(context_n, history, mask).shape == (4, 6, 24)


def test_candidates_sharing_a_history_equal_separate_calls():
    dec = _decoder()
    context, history, mask = _inputs(n=3)
    many = dec(context, history, mask)
    for j in range(3):
        torch.testing.assert_close(dec(context[:, j], history, mask), many[:, j], atol=1e-6, rtol=1e-5)


def test_masked_positions_are_ignored_and_empty_history_is_finite():
    dec = _decoder()
    context, history, mask = _inputs()
    out = dec(context, history, mask)
    noisy = torch.where(mask[..., None], history, torch.randn_like(history) * 50)
    torch.testing.assert_close(dec(context, noisy, mask), out)
    assert torch.isfinite(out).all()
    # An empty history: the queries see no item, so the history's content cannot matter.
    other = torch.randn_like(history)
    torch.testing.assert_close(dec(context, other, mask)[1], out[1])


def test_sdpa_and_reference_agree_with_gradients():
    fast, ref = _decoder("sdpa"), _decoder("reference")
    context, history, mask = _inputs(n=2)
    grads = []
    for dec in (fast, ref):
        h = history.clone().requires_grad_()
        out = dec(context, h, mask)
        out.square().sum().backward()
        grads.append((out.detach(), h.grad, dec.query_tokens.weight.grad))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
