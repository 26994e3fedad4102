"""The one masked-attention entry point: every implementation against the reference, masking, the
custom op's registration, and the exporter's switch. ("fused" on CPU tensors is the custom op with its
reference path and autograd formula; the Triton kernels themselves are tested in tests/kernels, and
behind every module's fused path at the end, interpreted on CPU tensors within kernels_on_cpu().)"""

import copy
from contextlib import nullcontext

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.kernels.attention_op import attention_cosine_op, kernels_on_cpu, masked_attention_op
from trainer.model.attention import (
    attention_sdpa,
    masked_attention,
    set_attention_impl,
    standard_attention,
)
from trainer.model.decoder import CrossAttentionDecoder
from trainer.model.fq_former import FQFormer
from trainer.model.target_attention import TargetAttention

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
# The ops run their kernels on CUDA tensors, and on CPU tensors within kernels_on_cpu().
KERNELS = nullcontext if CUDA else kernels_on_cpu


def _random_mask(gen: torch.Generator, b: int, s: int) -> torch.Tensor:
    mask = torch.rand(b, s, generator=gen) > 0.4
    mask[0] = False  # always one row with no key at all
    return mask


@pytest.mark.parametrize("impl", ["sdpa", "fused"])
@settings(max_examples=30, deadline=None)
@given(
    b=st.integers(1, 4),
    h=st.integers(1, 4),
    sq=st.integers(1, 7),
    sk=st.integers(1, 7),
    dh=st.integers(1, 16),
    seed=st.integers(0, 2**16),
)
def test_attention_impls_match_reference_forward_and_gradients(impl, b, h, sq, sk, dh, seed):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(b, h, s, dh, generator=gen, dtype=torch.float64) for s in (sq, sk, sk))
    mask = _random_mask(gen, b, sk)
    outs, grads = [], []
    for which in (impl, "reference"):
        leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]
        out = masked_attention(*leaves, mask, dh**-0.5, which)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        outs.append(out)
        grads.append([leaf.grad for leaf in leaves])
    torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=1e-5)
    for g_fast, g_ref in zip(grads[0], grads[1], strict=True):
        assert torch.isfinite(g_fast).all()
        torch.testing.assert_close(g_fast, g_ref, atol=1e-5, rtol=1e-5)
    assert outs[0][0].abs().max() == 0  # the row with no key gives zeros


@pytest.mark.parametrize("impl", ["reference", "sdpa", "fused"])
def test_attention_ignores_masked_keys_and_rejects_unknown_impl(impl):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 2, 3, 4, generator=gen) for _ in range(3))
    mask = torch.tensor([[True, False, True], [False, True, True]])
    base = masked_attention(q, k, v, mask, 0.5, impl)
    k2, v2 = k.clone(), v.clone()
    k2[0, :, 1], v2[0, :, 1] = 1e3, -1e4
    k2[1, :, 0], v2[1, :, 0] = -1e3, 1e4
    torch.testing.assert_close(masked_attention(q, k2, v2, mask, 0.5, impl), base)
    with pytest.raises(ValueError, match="unknown attention impl"):
        masked_attention(q, k, v, mask, impl="flash")


def test_default_scale_is_one_over_sqrt_head_dim():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 1, 3, 9, generator=gen) for _ in range(3))
    mask = torch.ones(2, 3, dtype=torch.bool)
    torch.testing.assert_close(masked_attention(q, k, v, mask), attention_sdpa(q, k, v, mask, 1 / 3))


def test_custom_ops_pass_opcheck():
    gen = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, s, 8, generator=gen, requires_grad=True) for s in (4, 5, 5))
    mask = _random_mask(gen, 2, 5)
    torch.library.opcheck(masked_attention_op, (q, k, v, mask, 0.3))
    qf = torch.randn(2, 1, 4, 8, generator=gen, requires_grad=True)
    hist = torch.randn(2, 5, 8, generator=gen, requires_grad=True)
    c = torch.randn(2, 4, 8, generator=gen, requires_grad=True)
    torch.library.opcheck(attention_cosine_op, (qf, hist, mask, c, 0.3, 3))


def test_log_sum_exp_and_top_index_outputs_are_not_differentiable():
    """The ops' backward formulas take no gradient for lse or top_index: a loss on them must fail, not
    silently give zero gradients."""
    gen = torch.Generator().manual_seed(3)
    q = torch.randn(2, 1, 4, 8, generator=gen, requires_grad=True)
    hist = torch.randn(2, 5, 8, generator=gen, requires_grad=True)
    mask = _random_mask(gen, 2, 5)
    out, lse = masked_attention_op(q, hist[:, None], hist[:, None], mask, 0.3)
    out_c, features, lse_c, top_index = attention_cosine_op(q, hist, mask, hist[:, :4], 0.3, 3)
    assert out.requires_grad and out_c.requires_grad and features.requires_grad
    for x in (lse, lse_c, top_index):
        assert not x.requires_grad
        with pytest.raises(RuntimeError, match="does not require grad"):
            x.float().sum().backward()


def test_one_switch_sets_every_attention_and_export_restores_it():
    module = torch.nn.ModuleDict(
        {"ta": TargetAttention(8, 2), "dec": CrossAttentionDecoder(8, 4, 2, 2, heads=2, impl="fused")}
    )
    impls = lambda: {m.attention_impl for m in module.modules() if hasattr(m, "attention_impl")}  # noqa: E731
    assert impls() == {"sdpa", "fused"}
    with standard_attention(module):
        assert impls() == {"sdpa"}
    assert impls() == {"sdpa", "fused"}
    set_attention_impl(module, "reference")
    assert impls() == {"reference"}
    with pytest.raises(ValueError, match="unknown attention impl"):
        set_attention_impl(module, "flash")


def test_onnx_export_of_a_fused_model_holds_standard_ops_only(tmp_path):
    import onnx
    import onnxruntime as ort

    torch.manual_seed(0)
    module = TargetAttention(8, 2, impl="fused").eval()
    gen = torch.Generator().manual_seed(5)
    target, history = torch.randn(2, 3, 8, generator=gen), torch.randn(2, 6, 8, generator=gen)
    mask = _random_mask(gen, 2, 6)
    path = tmp_path / "ta.onnx"
    with standard_attention(module), torch.inference_mode():
        torch.onnx.export(module, (target, history, mask), str(path), opset_version=17, dynamo=False)
    assert module.attention_impl == "fused"
    graph = onnx.load(str(path)).graph
    assert {node.domain for node in graph.node} <= {"", "ai.onnx"}
    feeds = dict(
        zip([i.name for i in graph.input], (target.numpy(), history.numpy(), mask.numpy()), strict=True)
    )
    (got,) = ort.InferenceSession(str(path)).run(None, feeds)
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(got), module(target, history, mask), atol=1e-5, rtol=1e-5)


# (module, its inputs, the call): tiny shapes, since the interpreter runs each program in Python.
def _fused_cases():
    gen = torch.Generator().manual_seed(7)
    target, history = torch.randn(3, 4, 8, generator=gen), torch.randn(3, 9, 8, generator=gen)
    mask = _random_mask(gen, 3, 9)
    tokens, token_mask = torch.randn(3, 5, 16, generator=gen), _random_mask(gen, 3, 5)
    torch.manual_seed(0)
    return {
        "target attention, 2 heads": (TargetAttention(8, 2), (target, history, mask), lambda m, *x: m(*x)),
        # one head: attention and LEMUR's similarity features in one kernel pass
        "target attention + similarity": (
            TargetAttention(8, 1),
            (target, history, mask),
            lambda m, *x: torch.cat(m.with_similarity(*x, 4), -1),
        ),
        "decoder": (CrossAttentionDecoder(8, 8, 2, 1, heads=2), (target, history, mask), lambda m, *x: m(*x)),
        "fq-former": (FQFormer(16, 2, 1, heads=4, dropout=0.0), (tokens, token_mask), lambda m, *x: m(*x)),
    }


# Autocast gives half-precision queries while the history stays float32, as the memory bank's does
# (bf16 only on a GPU: under Triton's interpreter a bf16 tl.dot returns garbage). Half-precision
# tolerances cover a few roundings at 2^-11 (fp16) or 2^-8 (bf16) of values and gradients of order 1.
AMP = {None: 1e-5, torch.float16: 1e-2, **({torch.bfloat16: 6e-2} if CUDA else {})}


@pytest.mark.parametrize("amp", AMP, ids=str)
@pytest.mark.parametrize("case", list(_fused_cases()))
def test_fused_modules_run_the_kernels_like_the_reference(case, amp):
    """Every module's fused path through the Triton kernels themselves: outputs and the gradients of
    inputs and parameters against a float64 copy of the module with the reference implementation."""
    module, inputs, call = _fused_cases()[case]
    ref = copy.deepcopy(module).double()
    set_attention_impl(ref, "reference")
    set_attention_impl(module, "fused")
    module.to(DEVICE)
    runs = (
        (module, [x.detach().to(DEVICE) for x in inputs], amp),
        (ref, [x.detach().double() if x.is_floating_point() else x for x in inputs], None),
    )
    results = []
    for m, xs, autocast in runs:
        xs = [x.requires_grad_() if x.is_floating_point() else x for x in xs]
        with KERNELS():
            with torch.autocast(DEVICE, autocast) if autocast else nullcontext():
                out = call(m, *xs)
            (out * torch.arange(out.numel(), device=out.device).view_as(out).cos()).sum().backward()
        grads = [x.grad for x in xs if x.is_floating_point()]
        params = [torch.zeros_like(p) if p.grad is None else p.grad for p in m.parameters()]
        results.append([out, *grads, *params])
    for got, want in zip(*results, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got.cpu().double(), want.detach(), atol=AMP[amp], rtol=AMP[amp])
