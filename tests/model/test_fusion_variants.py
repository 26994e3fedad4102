"""Fusion variants behind `build_fusion`: shapes, masking, backend parity, errors."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import MMRankError
from trainer.model.attention import set_attention_impl
from trainer.model.config import ContentConfig
from trainer.model.fq_former import FQFormer
from trainer.model.fusion_variants import (
    FUSIONS,
    MeanFusion,
    OneFlowFusion,
    TwoFlowFusion,
    build_fusion,
    masked_mean,
)

D = 16


def _fusion(name: str, layers: int = 1) -> torch.nn.Module:
    torch.manual_seed(0)
    cfg = ContentConfig(d=D, fusion=name, fusion_heads=4, fusion_layers=layers, dropout=0.0)
    return build_fusion(cfg).eval()


def _inputs(seed: int, b: int, segments: tuple[int, int]):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(b, sum(segments), D, generator=gen)
    mask = torch.rand(b, sum(segments), generator=gen) > 0.4
    mask[0] = False  # an item with every modality missing
    return tokens, mask


def test_factory_builds_each_variant():
    expected = {
        "fq_former": FQFormer,
        "masked": FQFormer,
        "mean": MeanFusion,
        "1flow": OneFlowFusion,
        "2flow": TwoFlowFusion,
    }
    assert set(expected) == set(FUSIONS)
    for name, cls in expected.items():
        assert isinstance(_fusion(name), cls)
    assert _fusion("fq_former").pool_query_values and not _fusion("masked").pool_query_values


@pytest.mark.parametrize("name", FUSIONS)
@settings(max_examples=10, deadline=None)
@given(b=st.integers(1, 5), text=st.integers(1, 4), image=st.integers(1, 3), seed=st.integers(0, 999))
def test_shapes_finite_and_backend_parity(name, b, text, image, seed):
    fusion = _fusion(name, layers=2)
    tokens, mask = _inputs(seed, b, (text, image))
    out = fusion(tokens, mask, segments=(text, image))
    assert out.shape == (b, D)
    assert torch.isfinite(out).all()
    set_attention_impl(fusion, "reference")
    torch.testing.assert_close(fusion(tokens, mask, segments=(text, image)), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", FUSIONS)
def test_masked_token_values_do_not_matter(name):
    fusion = _fusion(name, layers=2)
    tokens, mask = _inputs(3, 6, (3, 2))
    changed = tokens.clone()
    changed[~mask] = torch.randn(int((~mask).sum()), D) * 50
    torch.testing.assert_close(fusion(changed, mask, segments=(3, 2)), fusion(tokens, mask, segments=(3, 2)))


@pytest.mark.parametrize("name", ["1flow", "2flow", "fq_former", "masked"])
def test_gradients_reach_every_parameter(name):
    fusion = _fusion(name)
    tokens, mask = _inputs(1, 4, (2, 2))
    mask[1:] = True
    fusion(tokens, mask, segments=(2, 2)).square().sum().backward()
    missing = [n for n, p in fusion.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    assert not missing


def test_mean_is_the_masked_mean():
    tokens, mask = _inputs(0, 3, (2, 2))
    mask[1] = torch.tensor([True, False, True, False])
    out = MeanFusion()(tokens, mask)
    torch.testing.assert_close(out[1], (tokens[1, 0] + tokens[1, 2]) / 2)
    assert out[0].abs().max() == 0
    torch.testing.assert_close(out, masked_mean(tokens, mask))


def test_two_flow_streams_interact():
    fusion = _fusion("2flow")
    tokens, mask = _inputs(2, 4, (2, 2))
    mask[:] = True
    changed = tokens.clone()
    changed[:, 2:] += 1.0  # only the second stream
    # The first stream's pooled output changes through cross-attention, not just the second's.
    a_only = [fusion.layers[0](t[:, :2], mask[:, :2], t[:, 2:], mask[:, 2:])[0] for t in (tokens, changed)]
    assert not torch.allclose(a_only[0], a_only[1])


def test_two_flow_needs_two_segments():
    fusion = _fusion("2flow")
    tokens, mask = _inputs(0, 2, (2, 2))
    with pytest.raises(ValueError, match="two modalities"):
        fusion(tokens, mask)
    with pytest.raises(ValueError, match="two modalities"):
        fusion(tokens, mask, segments=(1, 1, 2))
    with pytest.raises(MMRankError, match="two modalities"):
        build_fusion(ContentConfig(fusion="2flow", modalities=("text",)))


def test_unknown_fusion_is_rejected():
    with pytest.raises(MMRankError, match="unknown fusion 'concat'"):
        build_fusion(ContentConfig(fusion="concat"))
