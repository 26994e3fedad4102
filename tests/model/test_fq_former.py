"""FQ-Former: implementation parity, value masking, and the public code's structure."""

import pytest
import torch

from trainer.model.attention import set_attention_impl, split_heads
from trainer.model.fq_former import FQFormer, MultiHeadAttention


def test_value_keep_removes_values_but_keeps_their_weight():
    torch.manual_seed(0)
    mha = MultiHeadAttention(8, 2)
    x = torch.randn(2, 4, 8)
    mask = torch.ones(2, 4, dtype=torch.bool)
    keep = torch.tensor([[False, True, True, True]] * 2)
    out = mha(x, x, mask, keep)
    # By hand: softmax over all 4 keys, weighted sum over keys 1..3 only.
    q, k, v = (split_heads(lin(x), 2) for lin in (mha.query, mha.key, mha.value))
    probs = (q @ k.transpose(-1, -2) * mha.scale).softmax(-1)
    expected = (probs[..., 1:] @ v[:, :, 1:]).transpose(1, 2).flatten(2)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("pool_query_values", [True, False])
@pytest.mark.parametrize("ffn_mult", [0, 2])
def test_fq_former_backends_agree(pool_query_values, ffn_mult):
    torch.manual_seed(1)
    model = FQFormer(
        16,
        num_queries=2,
        layers=2,
        heads=4,
        dropout=0.0,
        ffn_mult=ffn_mult,
        pool_query_values=pool_query_values,
    ).eval()
    tokens = torch.randn(5, 6, 16)
    mask = torch.rand(5, 6) > 0.5
    mask[0] = False
    fast = model(tokens, mask)
    for impl in ("reference", "fused"):
        set_attention_impl(model, impl)
        torch.testing.assert_close(fast, model(tokens, mask), atol=1e-5, rtol=1e-5)


def test_fq_former_shape_and_public_code_structure():
    torch.manual_seed(0)
    model = FQFormer(64, num_queries=2, layers=1, heads=4)
    assert model.queries.shape == (1, 2, 64)
    assert model.out.in_features == 2 * 64 and model.out.out_features == 64
    assert not any(isinstance(m, torch.nn.GELU) for m in model.modules())  # no FFN by default
    assert model(torch.randn(3, 5, 64), torch.ones(3, 5, dtype=torch.bool)).shape == (3, 64)
    with_ffn = FQFormer(64, ffn_mult=4)
    assert sum(p.numel() for p in with_ffn.parameters()) > sum(p.numel() for p in model.parameters())


def test_masked_tokens_do_not_change_the_output():
    torch.manual_seed(0)
    model = FQFormer(16, num_queries=2, layers=2, heads=2).eval()
    tokens = torch.randn(4, 5, 16)
    mask = torch.rand(4, 5) > 0.5
    changed = tokens.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), 16) * 100
    torch.testing.assert_close(model(changed, mask), model(tokens, mask))


def test_all_missing_item_is_finite_and_depends_on_queries_only():
    torch.manual_seed(0)
    model = FQFormer(16, num_queries=2, layers=1, heads=2).eval()
    mask = torch.zeros(3, 4, dtype=torch.bool)
    out = model(torch.randn(3, 4, 16), mask)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], out[1])  # nothing item-specific is left
    out.sum().backward()
    assert model.queries.grad is not None and model.queries.grad.abs().sum() > 0


def test_masked_variant_excludes_query_values():
    """With every modality token missing, the masked variant's attention pools nothing: each query
    output is LayerNorm(q + dense(0)), whereas the plain FQ-Former pools the queries' values."""
    torch.manual_seed(0)
    masked = FQFormer(8, num_queries=2, layers=1, heads=2, pool_query_values=False).eval()
    block = masked.layers[0].attention
    q = masked.queries[0]
    expected = masked.out(block.norm(q + block.dense.bias).flatten()).expand(2, -1)
    tokens, mask = torch.randn(2, 3, 8), torch.zeros(2, 3, dtype=torch.bool)
    torch.testing.assert_close(masked(tokens, mask), expected)
    plain = FQFormer(8, num_queries=2, layers=1, heads=2).eval()
    plain.load_state_dict(masked.state_dict())
    assert not torch.allclose(plain(tokens, mask), expected)
