"""torch custom ops over the fused attention kernels: `mmrank::masked_attention` and
`mmrank::attention_cosine`, each with a fake (meta) implementation and an autograd formula.

CUDA tensors run the Triton kernels of attention_triton.py; every other device runs the plain PyTorch
reference, so a model built with attention_impl="fused" trains and evaluates on a CPU too, and
`torch.library.opcheck` exercises the registration there. Inside `kernels_on_cpu()` CPU tensors run
the kernels too, under Triton's interpreter: how the tests run a model's fused path without a GPU.
ONNX export never sees these ops: the exporter switches models to the standard-op implementations
first (trainer.model.attention).

q's dtype is the computation's: the ops cast keys, values, history and c to it (and their gradients
back). Under autocast q comes out of a projection in the autocast dtype while the history may be
stored float32 vectors (the memory bank), and the kernels take one dtype; the reference casts alike,
so both paths compute in the same precision and return the same dtypes.

- masked_attention(q [B, H, N, D], k [B, H, L, D], v [B, H, L, DV], mask [B, L], scale)
  -> (out [B, H, N, DV], lse [B, H, N])
- attention_cosine(q [B, 1, N, D], history [B, L, D], mask [B, L], c [B, N, D], scale, topk)
  -> (out [B, N, D], features [B, N, 2 * topk], lse [B, N], top_index [B, N, topk] int32)
  keys and values are the history itself; features are LEMUR's k most recent cos(c, history) then the
  k largest in descending order (trainer.model.similarity), top_index where the largest were read
  (-1 where the history has fewer than k items).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import Tensor

from trainer.model.similarity import similarity_features

# A context variable, not a module flag: the setting ends with its block, and other threads never see it.
_KERNELS_ON_CPU: ContextVar[bool] = ContextVar("mmrank_kernels_on_cpu", default=False)


@contextmanager
def kernels_on_cpu() -> Iterator[None]:
    """Within the block the ops run the Triton kernels on CPU tensors too (Triton's interpreter), for
    tests of the models' fused path. The kernels must have been defined interpreted (TRITON_INTERPRET=1
    before their first import; tests/conftest.py sets it where there is no GPU)."""
    from triton.runtime.interpreter import InterpretedFunction

    from trainer.kernels.attention_triton import _fwd_kernel

    if not isinstance(_fwd_kernel, InterpretedFunction):
        raise RuntimeError(
            "kernels_on_cpu needs Triton's interpreter: set TRITON_INTERPRET=1 before trainer.kernels is imported"
        )
    token = _KERNELS_ON_CPU.set(True)
    try:
        yield
    finally:
        _KERNELS_ON_CPU.reset(token)


def _use_kernels(x: Tensor) -> bool:
    return x.is_cuda or _KERNELS_ON_CPU.get()


# ---- references (the CPU path, and what the kernels are tested against) ----------------------------
def attention_reference(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    """Plain masked softmax attention; rows whose mask is all False give zeros, never NaN."""
    has_key = mask.any(-1)
    # An all-False row would softmax over nothing (NaN, and NaN * 0 is still NaN): let it attend to
    # every key, then zero its output.
    safe = (mask | ~has_key[:, None])[:, None, None, :]
    probs = (torch.matmul(q, k.transpose(-1, -2)) * scale).masked_fill(~safe, float("-inf")).softmax(-1)
    return torch.matmul(probs, v) * has_key[:, None, None, None].to(v.dtype)


def _lse_reference(q: Tensor, k: Tensor, mask: Tensor, scale: float) -> Tensor:
    scores = (torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale).masked_fill(
        ~mask[:, None, None, :], float("-inf")
    )
    lse = scores.logsumexp(-1)
    return torch.where(mask.any(-1)[:, None, None], lse, torch.full_like(lse, float("inf")))


def _top_index_reference(c: Tensor, history: Tensor, mask: Tensor, topk: int) -> Tensor:
    unit = torch.nn.functional.normalize
    cos = unit(c.float(), dim=-1) @ unit(history.float(), dim=-1).transpose(1, 2)
    cos = cos.masked_fill(~mask[:, None, :], float("-inf"))
    if cos.shape[-1] < topk:
        cos = torch.cat([cos, cos.new_full((*cos.shape[:-1], topk - cos.shape[-1]), float("-inf"))], -1)
    values, index = torch.topk(cos, topk, dim=-1)
    return torch.where(torch.isfinite(values), index, -1).to(torch.int32)


def attention_backward_reference(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    """d(q, k, v) of `attention_reference` in closed form (custom-op bodies run below autograd)."""
    has_key = mask.any(-1)
    safe = (mask | ~has_key[:, None])[:, None, None, :]
    probs = (torch.matmul(q, k.transpose(-1, -2)) * scale).masked_fill(~safe, float("-inf")).softmax(-1)
    probs = probs * has_key[:, None, None, None].to(probs.dtype)
    dv = torch.matmul(probs.transpose(-1, -2), grad_out)
    dp = torch.matmul(grad_out, v.transpose(-1, -2))
    ds = probs * (dp - (dp * probs).sum(-1, keepdim=True))
    return torch.matmul(ds, k) * scale, torch.matmul(ds.transpose(-1, -2), q) * scale, dv


def cosine_backward_reference(
    grad_features: Tensor, history: Tensor, mask: Tensor, c: Tensor, top_index: Tensor
) -> tuple[Tensor, Tensor]:
    """d(history, c) of the similarity features: each feature's gradient goes to the history position
    it was read from (recent: the last k positions; ranked: top_index), then through
    cos = (c / |c|) . (h / |h|)."""
    b, n, _ = c.shape
    length, topk = history.shape[1], top_index.shape[-1]
    g_recent, g_ranked = grad_features[..., :topk].float(), grad_features[..., topk:].float()
    # Recent feature t was read at position L - k + t: place it after the history, roll it into place
    # (slots before position 0, for histories shorter than k, roll past the end and are cut off).
    grad = torch.zeros(b, n, length + topk, dtype=torch.float32, device=history.device)
    grad[..., length:] = g_recent
    grad = torch.roll(grad, -topk, dims=-1)[..., :length]
    grad = grad * mask[:, None, :]
    valid = top_index >= 0
    grad.scatter_add_(-1, top_index.long().clamp(min=0), torch.where(valid, g_ranked, 0.0))
    d_h = _through_unit(grad.transpose(1, 2) @ _unit(c.float()), history.float())
    d_c = _through_unit(grad @ _unit(history.float()), c.float())
    return d_h.to(history.dtype), d_c.to(c.dtype)


def _unit(x: Tensor) -> Tensor:
    return torch.nn.functional.normalize(x, dim=-1)


def _through_unit(grad_unit: Tensor, x: Tensor) -> Tensor:
    """Gradient of x from that of x / max(|x|, eps): remove the radial part, divide by the norm."""
    norm = x.norm(dim=-1, keepdim=True).clamp(min=1e-12)
    unit = x / norm
    return (grad_unit - (grad_unit * unit).sum(-1, keepdim=True) * unit) / norm


# ---- mmrank::masked_attention ----------------------------------------------------------------------
@torch.library.custom_op("mmrank::masked_attention", mutates_args=())
def masked_attention_op(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    k, v = k.to(q.dtype), v.to(q.dtype)
    if _use_kernels(q):
        from trainer.kernels.attention_triton import fused_forward

        res = fused_forward(q, k, v, mask, scale)
        return res.out, res.lse
    return attention_reference(q, k, v, mask, scale), _lse_reference(q, k, mask, scale)


@masked_attention_op.register_fake
def _(q, k, v, mask, scale):
    b, h, n, _ = q.shape
    return q.new_empty(b, h, n, v.shape[-1]), q.new_empty(b, h, n, dtype=torch.float32)


@torch.library.custom_op("mmrank::masked_attention_backward", mutates_args=())
def masked_attention_backward_op(
    grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, mask: Tensor, out: Tensor, lse: Tensor, scale: float
) -> tuple[Tensor, Tensor, Tensor]:
    kq, vq = k.to(q.dtype), v.to(q.dtype)
    if _use_kernels(q):
        from trainer.kernels.attention_triton import fused_backward

        res = fused_backward(q, kq, vq, mask, scale, out, lse, grad_out)
        dq, dk, dv = res.dq, res.dk, res.dv
    else:
        dq, dk, dv = (g.contiguous() for g in attention_backward_reference(grad_out, q, kq, vq, mask, scale))
    return dq, dk.to(k.dtype), dv.to(v.dtype)


@masked_attention_backward_op.register_fake
def _(grad_out, q, k, v, mask, out, lse, scale):
    return torch.empty_like(q), k.new_empty(k.shape), v.new_empty(v.shape)


def _masked_setup(ctx, inputs, output):
    q, k, v, mask, scale = inputs
    out, lse = output
    # lse is saved for the backward, and its gradient is not part of the formula: a loss on it must
    # fail loudly ("does not require grad"), not get zeros.
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(q, k, v, mask, out, lse)
    ctx.scale = scale


def _masked_backward(ctx, grad_out, _grad_lse):
    q, k, v, mask, out, lse = ctx.saved_tensors
    dq, dk, dv = masked_attention_backward_op(grad_out, q, k, v, mask, out, lse, ctx.scale)
    return dq, dk.sum_to_size(k.shape), dv.sum_to_size(v.shape), None, None


masked_attention_op.register_autograd(_masked_backward, setup_context=_masked_setup)


# ---- mmrank::attention_cosine ----------------------------------------------------------------------
@torch.library.custom_op("mmrank::attention_cosine", mutates_args=())
def attention_cosine_op(
    q: Tensor, history: Tensor, mask: Tensor, c: Tensor, scale: float, topk: int
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    history, c = history.to(q.dtype), c.to(q.dtype)
    hist = history[:, None]
    if _use_kernels(q):
        from trainer.kernels.attention_triton import fused_forward

        res = fused_forward(q, hist, hist, mask, scale, c, topk)
        return res.out[:, 0], res.features, res.lse[:, 0], res.top_index
    out = attention_reference(q, hist, hist, mask, scale)[:, 0]
    features = similarity_features(c, history, mask, topk)
    lse = _lse_reference(q, hist, mask, scale)[:, 0]
    return out, features, lse, _top_index_reference(c, history, mask, topk)


@attention_cosine_op.register_fake
def _(q, history, mask, c, scale, topk):
    b, _, n, _ = q.shape
    return (
        q.new_empty(b, n, history.shape[-1]),
        q.new_empty(b, n, 2 * topk),
        q.new_empty(b, n, dtype=torch.float32),
        q.new_empty(b, n, topk, dtype=torch.int32),
    )


@torch.library.custom_op("mmrank::attention_cosine_backward", mutates_args=())
def attention_cosine_backward_op(
    grad_out: Tensor,
    grad_features: Tensor,
    q: Tensor,
    history: Tensor,
    mask: Tensor,
    c: Tensor,
    out: Tensor,
    lse: Tensor,
    top_index: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor, Tensor]:
    hq, cq = history.to(q.dtype), c.to(q.dtype)
    hist = hq[:, None]
    if _use_kernels(q):
        from trainer.kernels.attention_triton import fused_backward

        res = fused_backward(
            q, hist, hist, mask, scale, out[:, None], lse[:, None], grad_out[:, None],
            cq, grad_features, top_index, same_kv=True,
        )  # fmt: skip
        dq, d_hist, d_c = res.dq, res.dk[:, 0], res.dc
    else:
        dq, dk, dv = attention_backward_reference(grad_out[:, None], q, hist, hist, mask, scale)
        d_h, d_c = cosine_backward_reference(grad_features, hq, mask, cq, top_index)
        dq, d_hist, d_c = dq.contiguous(), (dk[:, 0] + dv[:, 0] + d_h).contiguous(), d_c.contiguous()
    return dq, d_hist.to(history.dtype), d_c.to(c.dtype)


@attention_cosine_backward_op.register_fake
def _(grad_out, grad_features, q, history, mask, c, out, lse, top_index, scale):
    return torch.empty_like(q), torch.empty_like(history), torch.empty_like(c)


def _cosine_setup(ctx, inputs, output):
    q, history, mask, c, scale, _topk = inputs
    out, _features, lse, top_index = output
    ctx.mark_non_differentiable(lse, top_index)  # as in _masked_setup; top_index is a position
    ctx.save_for_backward(q, history, mask, c, out, lse, top_index)
    ctx.scale = scale


def _cosine_backward(ctx, grad_out, grad_features, _grad_lse, _grad_index):
    q, history, mask, c, out, lse, top_index = ctx.saved_tensors
    grad_out = torch.zeros_like(out) if grad_out is None else grad_out
    if grad_features is None:
        grad_features = out.new_zeros(*out.shape[:-1], 2 * top_index.shape[-1])
    dq, dhist, dc = attention_cosine_backward_op(
        grad_out.contiguous(), grad_features.contiguous(), q, history, mask, c, out, lse, top_index, ctx.scale
    )
    return dq, dhist, None, dc, None, None


attention_cosine_op.register_autograd(_cosine_backward, setup_context=_cosine_setup)
