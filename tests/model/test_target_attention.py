import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.model.similarity import similarity_features
from trainer.model.target_attention import TargetAttention


def _inputs(seed: int, b: int, n: int, length: int, d: int):
    gen = torch.Generator().manual_seed(seed)
    target = torch.randn(b, n, d, generator=gen)
    history = torch.randn(b, length, d, generator=gen)
    mask = torch.rand(b, length, generator=gen) < 0.6
    mask[0] = False  # always one empty history
    return target, history, mask


def _grad(p: torch.nn.Parameter) -> torch.Tensor:
    return torch.zeros_like(p) if p.grad is None else p.grad.clone()


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    b=st.integers(1, 4),
    n=st.integers(1, 5),
    length=st.integers(1, 12),
    heads=st.sampled_from([1, 2, 4]),
)
@pytest.mark.parametrize("impl", ["sdpa", "fused"])
def test_impls_match_reference_forward_and_gradients(impl, seed, b, n, length, heads):
    """'fused' folds the key projection into the query (on CPU through the custom op's reference)."""
    target, history, mask = _inputs(seed, b, n, length, 8)
    torch.manual_seed(seed)
    fast = TargetAttention(8, heads, impl=impl)
    ref = TargetAttention(8, heads, impl="reference")
    ref.load_state_dict(fast.state_dict())
    outs, grads = [], []
    for module in (fast, ref):
        t, h = target.clone().requires_grad_(), history.clone().requires_grad_()
        out = module(t, h, mask)
        (out * torch.arange(out.numel()).reshape(out.shape).sin()).sum().backward()
        outs.append(out.detach())
        # The key bias shifts every score of a row alike, so its true gradient is 0: the folded form
        # never uses it (None), the others get it within rounding of 0.
        grads.append([t.grad, h.grad, *[_grad(p) for p in module.parameters()]])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for g_fast, g_ref in zip(*grads, strict=True):
        assert torch.isfinite(g_fast).all()
        torch.testing.assert_close(g_fast, g_ref, atol=1e-5, rtol=1e-5)


def test_identity_projections_give_eq_7_8_by_hand():
    module = TargetAttention(2, impl="sdpa")
    with torch.no_grad():
        for lin in (module.query, module.key):
            lin.weight.copy_(torch.eye(2))
            lin.bias.zero_()
    c = torch.tensor([[1.0, 0.0]])
    hist = torch.tensor([[[2.0, 0.0], [0.0, 1.0], [5.0, 5.0]]])
    mask = torch.tensor([[True, True, False]])
    scores = torch.tensor([2.0, 0.0]) / math.sqrt(2)
    w = scores.exp() / scores.exp().sum()
    expected = w[0] * hist[0, 0] + w[1] * hist[0, 1]
    for impl in ("sdpa", "reference", "fused"):
        module.attention_impl = impl
        torch.testing.assert_close(module(c, hist, mask)[0], expected)


def test_masked_positions_do_not_matter_and_empty_history_gives_zeros():
    torch.manual_seed(0)
    module = TargetAttention(8, heads=2)
    target, history, mask = _inputs(3, 3, 4, 6, 8)
    out = module(target, history, mask)
    noisy = torch.where(mask[..., None], history, torch.randn_like(history) * 100)
    torch.testing.assert_close(module(target, noisy, mask), out)
    assert torch.equal(out[0], torch.zeros(4, 8))
    assert torch.isfinite(out).all()


def test_single_target_equals_one_candidate_and_candidates_are_independent():
    torch.manual_seed(0)
    module = TargetAttention(8, heads=2)
    target, history, mask = _inputs(5, 3, 4, 6, 8)
    many = module(target, history, mask)
    for j in range(4):
        torch.testing.assert_close(module(target[:, j], history, mask), many[:, j])


def test_unknown_impl_and_indivisible_heads_are_rejected():
    with pytest.raises(ValueError, match="unknown attention impl"):
        TargetAttention(8, impl="flash")
    with pytest.raises(ValueError, match="not divisible"):
        TargetAttention(6, heads=4)


@pytest.mark.parametrize("heads", [1, 2])
@pytest.mark.parametrize("length", [1, 3, 9])
def test_with_similarity_is_attention_plus_the_similarity_features(heads, length):
    """The fused one-pass entry gives the same u and features (and gradients) as the two computations."""
    target, history, mask = _inputs(7, 3, 4, length, 8)
    torch.manual_seed(0)
    fused = TargetAttention(8, heads, impl="fused")
    ref = TargetAttention(8, heads, impl="reference")
    ref.load_state_dict(fused.state_dict())
    results = []
    for module in (fused, ref):
        t, h = target.clone().requires_grad_(), history.clone().requires_grad_()
        if module is fused:
            u, feats = module.with_similarity(t, h, mask, 4)
        else:
            u, feats = module(t, h, mask), similarity_features(t, h, mask, 4)
        weights = torch.arange(u.numel() + feats.numel()).float().cos()
        (torch.cat([u.flatten(), feats.flatten()]) * weights).sum().backward()
        results.append([u.detach(), feats.detach(), t.grad, h.grad, *[_grad(p) for p in module.parameters()]])
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
