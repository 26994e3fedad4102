"""The one masked-attention entry point of the model, with its head split and its implementation switch.

FQ-Former, target attention and the cross-attention decoder all call `masked_attention`:

    out = softmax(scale * q k^T, masked to the keys where mask is True) v,   zeros for an empty mask row

with one of three implementations, chosen per module by its `attention_impl` attribute:
- "reference": explicit scores, -inf fill, softmax, weighted sum (what the others are tested against);
- "sdpa": torch's scaled_dot_product_attention (fused CPU/CUDA kernels, and what ONNX export traces);
- "fused": the Triton kernel behind the `mmrank::masked_attention` custom op on CUDA tensors (its CPU
  path is the reference).

`set_attention_impl` is the one switch: the exporter sets every module of a model to a standard-op
implementation before tracing, the trainer's config sets `model.interest.attention_impl`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch.nn.functional as F
from torch import Tensor, nn

from trainer.kernels.attention_op import attention_reference, masked_attention_op

ATTENTION_IMPLS = ("reference", "sdpa", "fused")


def check_impl(impl: str) -> str:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention impl {impl!r}; expected one of {ATTENTION_IMPLS}")
    return impl


def split_heads(x: Tensor, heads: int) -> Tensor:
    """[B, T, d] -> [B, H, T, d / H]."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """[B, H, T, d / H] -> [B, T, d]."""
    return x.transpose(1, 2).flatten(-2)


def masked_attention(
    q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float | None = None, impl: str = "sdpa"
) -> Tensor:
    """q [B, H, N, Dk] over k [B, H, L, Dk], v [B, H, L, Dv] where mask [B, L] is True
    -> [B, H, N, Dv]; rows whose mask is all False get zeros. scale defaults to 1 / sqrt(Dk)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if impl == "reference":
        return attention_reference(q, k, v, mask, scale)
    if impl == "sdpa":
        return attention_sdpa(q, k, v, mask, scale)
    check_impl(impl)  # "fused" is the one left
    return masked_attention_op(q, k, v, mask, scale)[0]


def attention_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, scale: float) -> Tensor:
    has_key = mask.any(-1)
    # An all-False row would softmax over nothing (NaN in some kernels): let it attend to every key,
    # then zero its output.
    safe = (mask | ~has_key[:, None])[:, None, None, :]
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=safe, scale=scale)
    return out * has_key[:, None, None, None].to(out.dtype)


def set_attention_impl(module: nn.Module, impl: str) -> None:
    """Switch every attention inside `module` (any submodule with an `attention_impl`) to `impl`."""
    check_impl(impl)
    for sub in module.modules():
        if hasattr(sub, "attention_impl"):
            sub.attention_impl = impl


def use_standard_attention(module: nn.Module, plain: bool = False) -> None:
    """Before tracing for ONNX: the fused custom op becomes SDPA (or, with `plain`, every attention
    becomes the reference, whose ops type-check in an fp16 graph where SDPA's traced mask does not)."""
    for sub in module.modules():
        if hasattr(sub, "attention_impl") and (plain or sub.attention_impl == "fused"):
            sub.attention_impl = "reference" if plain else "sdpa"


@contextmanager
def standard_attention(module: nn.Module) -> Iterator[nn.Module]:
    """`use_standard_attention` for the duration of a block; the module's own settings come back after."""
    before = {sub: sub.attention_impl for sub in module.modules() if hasattr(sub, "attention_impl")}
    use_standard_attention(module)
    try:
        yield module
    finally:
        for sub, impl in before.items():
            sub.attention_impl = impl
