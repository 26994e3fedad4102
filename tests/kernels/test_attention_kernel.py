"""The fused attention kernels themselves (trainer/kernels/attention_triton.py) against the reference.

Without a GPU they run under Triton's interpreter (TRITON_INTERPRET=1, set in tests/conftest.py) on CPU
tensors, at fp32 and fp16; on a GPU the same tests run compiled, in bf16 too. Shapes are small and
chosen to hit the edges: tiles of 16 with N and L that are not multiples, L = 1, N = 1, histories
shorter than k, rows with no history at all, d that is not a power of two, several heads.
"""

from contextlib import nullcontext

import pytest
import torch
import torch.nn.functional as F

from trainer.kernels.attention_op import (
    attention_backward_reference,
    attention_cosine_op,
    attention_reference,
    cosine_backward_reference,
    kernels_on_cpu,
    masked_attention_op,
)
from trainer.kernels.attention_triton import Blocks, fused_backward, fused_forward
from trainer.model.similarity import similarity_features

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
BLOCKS = Blocks(n=16, l=16, warps=4 if CUDA else 1, stages=1)
# bf16 is GPU-only: under Triton's interpreter a bf16 tl.dot returns garbage (values around 1e10).
DTYPES = [torch.float32, torch.float16, torch.bfloat16] if CUDA else [torch.float32, torch.float16]
# The ops run their kernels on CUDA tensors, and on CPU tensors within kernels_on_cpu().
KERNELS = nullcontext if CUDA else kernels_on_cpu
# fp32 products stay fp32 ("ieee"); half types round q, k, v and the probabilities (about 2^-11 / 2^-8).
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}

# (B, N, L, D, topk): tile edges, L = 1, N = 1, k > L, d not a power of two, more than one tile each way;
# the last, the widest under the interpreter, is left to the full suite (`make test-fast` skips it).
SHAPES = [
    (2, 19, 37, 24, 5),
    (1, 1, 1, 16, 3),
    (3, 1, 20, 32, 4),
    (2, 33, 1, 16, 2),
    pytest.param((1, 40, 50, 64, 10), marks=pytest.mark.slow, id="shape4"),
]


def _inputs(shape, dtype, seed=0):
    b, n, length, d, _ = shape
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, 1, n, d, generator=gen) / d**0.25
    hist = torch.randn(b, length, d, generator=gen)
    c = torch.randn(b, n, d, generator=gen)
    mask = torch.rand(b, length, generator=gen) < 0.7
    mask[0] = False  # a request with an empty history
    if b > 1:
        mask[1] = True  # and one with every position present
    cast = lambda x: x.to(DEVICE, dtype)  # noqa: E731
    return cast(q), cast(hist), cast(c), mask.to(DEVICE)


def _close(got, want, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=tol)


def _close_grad(got, want, dtype):
    """Gradients sum over many positions: half-precision rounding scales with the largest entry."""
    tol = TOL[dtype] * (1.0 if dtype == torch.float32 else max(1.0, float(want.abs().max())))
    torch.testing.assert_close(got.float(), want.float(), atol=tol, rtol=TOL[dtype])


def _reference(q, hist, c, mask, topk):
    """Attention output and the similarity features, computed in float64 on the CPU."""
    q, hist, c = (x.double().cpu() for x in (q, hist, c))
    mask = mask.cpu()
    out = attention_reference(q, hist[:, None], hist[:, None], mask, 0.7)[:, 0]
    return out, similarity_features(c, hist, mask, topk)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_forward_matches_reference_attention_and_cosine_features(shape, dtype):
    q, hist, c, mask = _inputs(shape, dtype)
    topk = shape[-1]
    res = fused_forward(q, hist[:, None], hist[:, None], mask, 0.7, c, topk, BLOCKS)
    want_out, want_feat = _reference(q, hist, c, mask, topk)
    _close(res.out[:, 0].cpu(), want_out, dtype)
    assert torch.isfinite(res.out).all() and res.out[0].abs().max() == 0  # empty history: zeros
    _close(res.features.cpu(), want_feat, dtype)
    present = mask.sum(-1).clamp(max=topk)
    assert ((res.top_index >= 0).sum(-1) == present[:, None]).all()  # exactly the present items are ranked
    if dtype == torch.float32:  # ranked positions are where the reference's k largest were read
        cos = F.normalize(c.double(), dim=-1) @ F.normalize(hist.double(), dim=-1).transpose(1, 2)
        idx = res.top_index.long()
        got = torch.where(idx >= 0, cos.gather(-1, idx.clamp(min=0)), 0.0)
        _close(got.cpu(), want_feat[..., topk:], dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_backward_matches_reference_autograd(shape, dtype):
    q, hist, c, mask = _inputs(shape, dtype, seed=1)
    topk = shape[-1]
    h = hist[:, None]
    res = fused_forward(q, h, h, mask, 0.7, c, topk, BLOCKS)
    gen = torch.Generator().manual_seed(2)
    g_out = torch.randn(res.out.shape, generator=gen).to(DEVICE, dtype)
    g_feat = torch.randn(res.features.shape, generator=gen).to(DEVICE, dtype)
    grads = fused_backward(
        q, h, h, mask, 0.7, res.out, res.lse, g_out, c, g_feat, res.top_index, same_kv=True, blocks=BLOCKS
    )
    # In half precision near-equal cosines may rank in another order than in float64, which moves
    # a feature's gradient to another position: the reference routes it where the kernel read it (the
    # forward test checks the ranked values themselves).
    want = _reference_grads(q, hist, c, mask, g_out, g_feat, res.top_index)
    for got, ref in zip((grads.dq[:, 0], grads.dk[:, 0], grads.dc), want, strict=True):
        _close_grad(got.cpu(), ref, dtype)


def _reference_grads(q, hist, c, mask, g_out, g_feat, top_index):
    """float64 CPU gradients of (q, history, c): attention in closed form plus the cosine features'
    gradient routed through `top_index`."""
    q, hist, c, g_out, g_feat = (x.detach().double().cpu() for x in (q, hist, c, g_out, g_feat))
    h = hist[:, None]
    mask = mask.cpu()
    dq, dk, dv = attention_backward_reference(
        g_out.reshape(q.shape[0], 1, *g_out.shape[-2:]), q, h, h, mask, 0.7
    )
    d_hist, d_c = cosine_backward_reference(g_feat, hist, mask, c, top_index.cpu())
    return dq[:, 0], dk[:, 0] + dv[:, 0] + d_hist, d_c


@pytest.mark.parametrize("heads", [1, 3])
def test_kernel_multi_head_attention_with_separate_keys_and_values(heads):
    """The generic path (FQ-Former, decoder): per-head keys and values, DV != D, no cosine."""
    gen = torch.Generator().manual_seed(3)
    b, n, length, d, dv = 3, 21, 18, 16, 24
    q, k = (torch.randn(b, heads, s, d, generator=gen).to(DEVICE) for s in (n, length))
    v = torch.randn(b, heads, length, dv, generator=gen).to(DEVICE)
    mask = torch.rand(b, length, generator=gen) < 0.5
    mask[2] = False
    mask = mask.to(DEVICE)
    res = fused_forward(q, k, v, mask, 0.25, blocks=BLOCKS)
    want = attention_reference(q.cpu(), k.cpu(), v.cpu(), mask.cpu(), 0.25)
    _close(res.out.cpu(), want, torch.float32)
    g = torch.randn(res.out.shape, generator=gen).to(DEVICE)
    grads = fused_backward(q, k, v, mask, 0.25, res.out, res.lse, g, blocks=BLOCKS)
    leaves = [x.detach().cpu().requires_grad_() for x in (q, k, v)]
    want_grads = torch.autograd.grad(attention_reference(*leaves, mask.cpu(), 0.25), leaves, g.cpu())
    for got, ref in zip((grads.dq, grads.dk, grads.dv), want_grads, strict=True):
        _close_grad(got.cpu(), ref, torch.float32)


@pytest.mark.gpu  # a GPU-sized shape: the CPU interpreter runs the ops at small ones below
@pytest.mark.parametrize("dtype", DTYPES)
def test_attention_ops_on_cuda_match_their_cpu_reference(dtype):
    q, hist, c, mask = _inputs((4, 300, 130, 64, 10), dtype, seed=4)
    for x in (q, hist, c):
        x.requires_grad_()
    out, feats, _, index = attention_cosine_op(q, hist, mask, c, 0.7, 10)
    g_out, g_feat = out.detach().float().cos(), -feats.detach().float().sin()
    (out.float().sin().sum() + feats.float().cos().sum()).backward()
    ref_out, ref_feats, _, _ = attention_cosine_op(
        *(x.detach().cpu().double() for x in (q, hist)), mask.cpu(), c.detach().cpu().double(), 0.7, 10
    )
    _close(out.cpu(), ref_out, dtype)
    _close(feats.cpu(), ref_feats, dtype)
    want = _reference_grads(q, hist, c, mask, g_out, g_feat, index)
    for x, ref in zip((q, hist, c), want, strict=True):
        _close_grad(x.grad.reshape(ref.shape).cpu(), ref, dtype)
    heads = q.detach().expand(4, 2, 300, 64)
    k = hist.detach()[:, None].expand(4, 2, 130, 64)
    got = masked_attention_op(heads, k, k, mask, 0.7)[0]
    want = attention_reference(*(x.cpu().double() for x in (heads, k, k)), mask.cpu(), 0.7)
    _close(got.cpu(), want, dtype)


def test_kernel_cosine_features_alone():
    """Without queries the kernel computes the cosine features only (the benchmark's attribution run)."""
    q, hist, c, mask = _inputs(SHAPES[0], torch.float32, seed=6)
    topk = SHAPES[0][-1]
    res = fused_forward(None, hist[:, None], None, mask, 1.0, c, topk, BLOCKS)
    assert res.out is None and res.lse is None
    _close(res.features.cpu(), _reference(q, hist, c, mask, topk)[1], torch.float32)


def test_kernels_reject_mixed_dtypes_with_a_clear_message():
    q, hist, c, mask = _inputs(SHAPES[1], torch.float32)
    h, h16 = hist[:, None], hist[:, None].half()
    with pytest.raises(TypeError, match="one dtype for q, k, v and c, got q torch.float16, k torch.float32"):
        fused_forward(q.half(), h, h, mask, 0.7, blocks=BLOCKS)
    with pytest.raises(TypeError, match="c torch.float32"):
        fused_forward(q.half(), h16, h16, mask, 0.7, c, 3, BLOCKS)
    res = fused_forward(q, h, h, mask, 0.7, blocks=BLOCKS)
    with pytest.raises(TypeError, match="v torch.float16"):
        fused_backward(q, h, h16, mask, 0.7, res.out, res.lse, res.out)


def test_ops_cast_keys_values_history_and_targets_to_the_query_dtype():
    """Under autocast a projected query is half precision while the history may be stored float32 (the
    memory bank): the ops run the kernels in q's dtype and return each input's gradient in its dtype."""
    q, hist, c, mask = _inputs((2, 5, 9, 16, 3), torch.float32, seed=7)
    q = q.half().requires_grad_()
    hist, c = hist.requires_grad_(), c.requires_grad_()
    gen = torch.Generator().manual_seed(8)
    g_out, g_feat = torch.randn(2, 5, 16, generator=gen).half(), torch.randn(2, 5, 6, generator=gen).half()
    g_out, g_feat = g_out.to(DEVICE), g_feat.to(DEVICE)
    with KERNELS():
        out, feats, _, index = attention_cosine_op(q, hist, mask, c, 0.7, 3)
        ((out * g_out).sum() + (feats * g_feat).sum()).backward()
    assert out.dtype == feats.dtype == q.grad.dtype == torch.float16
    assert hist.grad.dtype == c.grad.dtype == torch.float32
    want_out, want_feat = _reference(q, hist, c, mask, 3)
    _close(out.cpu(), want_out, torch.float16)
    _close(feats.cpu(), want_feat, torch.float16)
    want = _reference_grads(q, hist, c, mask, g_out, g_feat, index)
    for x, ref in zip((q, hist, c), want, strict=True):
        _close_grad(x.grad.reshape(ref.shape).cpu(), ref, torch.float16)

    heads = q.detach().expand(2, 2, 5, 16).requires_grad_()
    k = hist.detach()[:, None].expand(2, 2, 9, 16).requires_grad_()
    g = g_out[:, None].expand(2, 2, 5, 16)
    with KERNELS():
        got = masked_attention_op(heads, k, k, mask, 0.7)[0]
        (got * g).sum().backward()
    leaves = [x.detach().cpu().double().requires_grad_() for x in (heads, k)]
    want = attention_reference(leaves[0], leaves[1], leaves[1], mask.cpu(), 0.7)
    (want * g.cpu().double()).sum().backward()
    _close(got.cpu(), want, torch.float16)
    assert heads.grad.dtype == torch.float16 and k.grad.dtype == torch.float32
    for x, ref in zip((heads, k), leaves, strict=True):
        _close_grad(x.grad.cpu(), ref.grad, torch.float16)
