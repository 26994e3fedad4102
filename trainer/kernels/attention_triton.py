"""Fused masked attention + LEMUR cosine features in Triton: forward and backward kernels, and launchers.

Problem shape: B requests, each with N candidates (queries) sharing one history of L vectors and a key
mask [B, L]; H heads. Per (request, head, tile of candidates) one program streams the history tiles
once, keeping the online-softmax state (FlashAttention-2) and, with COSINE, the cosine features LEMUR
feeds its ranker, so the scores never reach device memory:

- attention  out[n] = sum_j softmax_j(scale * q_n . k_j) v_j over unmasked j; an empty history gives 0;
- recent     cos(c_n, k_j) for the k most recent positions (j >= L - k; histories are right-aligned);
- top-k      the k largest cos(c_n, k_j) over unmasked j, descending, and where they are.

With COSINE the keys are the raw history vectors (EM3 eq. 7: values = history; the target-attention
module folds its key projection into the query, see trainer/model/attention.py), so the tile that
feeds the scores also feeds the cosines: `c` arrives L2-normalised and the key norms are taken
in-kernel. Top-k packs each (cosine, position) pair into one int64 key and keeps the row's k largest
keys, sorted; per tile two bitonic `tl.topk` passes (the tile's own k largest, then the k largest of
those and the running ones) update them with fixed work, no data-dependent loop.

The backward follows FlashAttention-2 (recompute the probabilities from the saved log-sum-exp): one
kernel per history tile accumulates dK, dV and the cosine gradient of the history; one per candidate
tile accumulates dQ and the cosine gradient of c. The cosine gradient routes each feature's gradient to
the position it was read from, rebuilt per tile from the saved top-k positions.

Launchers take strided tensors (a head dimension of stride 0 broadcasts one history to every head)
of one floating dtype (`tl.dot` takes no mixed operands; the torch ops cast to q's) and work under
Triton's interpreter (TRITON_INTERPRET=1) on CPU tensors, which is how the tests run the kernels on
machines without a GPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl
from torch import Tensor

COS_EPS = tl.constexpr(1e-12)  # F.normalize's eps: a zero history vector has cosine 0 with everything


@dataclass(frozen=True)
class Blocks:
    """Tile sizes and launch shape. Candidates per program, history positions per tile, warps, stages."""

    n: int = 64
    l: int = 64  # noqa: E741
    warps: int = 4
    stages: int = 2


def default_blocks(d: int, device: torch.device, backward: bool = False) -> Blocks:
    if device.type != "cuda":
        return Blocks(n=16, l=16, warps=1, stages=1)  # the interpreter: small tiles run fastest
    if backward and d > 64:
        # Three [64, d] float32 accumulators per program: with 64 x 64 tiles and 4 warps ptxas spills
        # 2.1 KB per thread in the dK/dV kernel; 64 x 32 tiles and 8 warps spill 160 B and keep the
        # Hopper matrix instructions (benchmarks/results/kernel_resources.md; not yet timed).
        return Blocks(n=64, l=32, warps=8, stages=2)
    # Measured on an H200 at B, N, L, d = 32, 2000, 1000, 128 (fp16 forward, benchmarks/results/
    # kernel_attention.md): 4 warps 843 us, 8 warps 1404 us with 64 x 64 tiles.
    return Blocks(n=64, l=64, warps=4, stages=2)


# A packed top-k key: the cosine's bits made order-preserving as a signed int32 (negative floats have
# their magnitude bits flipped) in the high word, the history position in the low word. Sorting keys
# sorts by cosine and carries the position along. NONE_KEY is below every packed cosine >= -1.
NONE_KEY = tl.constexpr(-0x7FFFFFFFFFFFFFFF)


@triton.jit
def _pack(cos, pos):
    bits = cos.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)
    return (key.to(tl.int64) << 32) | pos.to(tl.int64)[None, :]


@triton.jit
def _unpack(packed):
    key = (packed >> 32).to(tl.int32)
    bits = tl.where(key >= 0, key, key ^ 0x7FFFFFFF)
    return bits.to(tl.float32, bitcast=True), (packed & 0xFFFFFFFF).to(tl.int32)


@triton.jit
def _tile(base, rows, row_stride, rows_ok, cols, col_stride, n_cols):
    """A [rows, cols] tile of a strided tensor, zeros outside it."""
    ptrs = base + rows[:, None] * row_stride + cols[None, :] * col_stride
    return tl.load(ptrs, mask=rows_ok[:, None] & (cols[None, :] < n_cols), other=0.0)


@triton.jit
def _row_norms(x):
    """max(|row|, COS_EPS) in float32, F.normalize's denominator."""
    xf = x.to(tl.float32)
    return tl.maximum(tl.sqrt(tl.sum(xf * xf, 1)), COS_EPS)


@triton.jit
def _through_unit(grad_unit, x):
    """Gradient of x from that of x / max(|x|, eps): remove the radial part, divide by the norm."""
    norm = _row_norms(x)
    unit = x.to(tl.float32) / norm[:, None]
    return (grad_unit - tl.sum(grad_unit * unit, 1)[:, None] * unit) / norm[:, None]


@triton.jit
def _unit_rows(c):
    """Rows of c divided by max(|c|, COS_EPS) (F.normalize), in c's dtype."""
    return (c.to(tl.float32) / _row_norms(c)[:, None]).to(c.dtype)


@triton.jit
def _bh_and_tile(n_items, BLOCK: tl.constexpr):
    """(b * h index, tile index) of this program on the 1-D grid `_grid` launches.

    One axis because CUDA's grid axes 1 and 2 stop at 65535 (b * h exceeds that) and axis 0 at
    2^31 - 1; tiles vary fastest so the programs that read one (b, h)'s K/V (or Q/dO) run next to
    each other and find it in L2.
    """
    n_tiles = tl.cdiv(n_items, BLOCK)
    pid = tl.program_id(0)
    return pid // n_tiles, pid % n_tiles


# ---- forward ---------------------------------------------------------------------------------------
@triton.jit
def _fwd_kernel(
    Q, K, V, Mask, C,
    Out, Lse, Feat, TopI,
    scale,
    sqb, sqh, sqn, sqd,
    skb, skh, skl, skd,
    svb, svh, svl, svd,
    smb, sml,
    scb, scn, scd,
    sob, soh, son, sod,
    H, N, L,
    D: tl.constexpr, DV: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ATTENTION: tl.constexpr, COSINE: tl.constexpr, TOPK: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    pid_bh, pid_n = _bh_and_tile(N, BLOCK_N)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < N

    if ATTENTION:
        q = _tile(Q + b * sqb + h * sqh, offs_n, sqn, n_ok, offs_d, sqd, D)
    m_i = tl.full([BLOCK_N], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_N], tl.float32)
    acc = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    if COSINE:
        c = _unit_rows(_tile(C + b * scb, offs_n, scn, n_ok, offs_d, scd, D))
        offs_k = tl.arange(0, BLOCK_K)
        # The k largest so far, as packed (cosine, position) keys, sorted descending.
        best = tl.full([BLOCK_N, BLOCK_K], NONE_KEY, tl.int64)

    for start in range(0, L, BLOCK_L):
        offs_l = start + tl.arange(0, BLOCK_L)
        l_in = offs_l < L
        keep = tl.load(Mask + b * smb + offs_l * sml, mask=l_in, other=0) != 0
        k = _tile(K + b * skb + h * skh, offs_l, skl, l_in, offs_d, skd, D)
        if ATTENTION:
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            s = tl.where(keep[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            # Rows that have seen no key yet keep m = -inf; shift by 0 there so exp() gives 0, not NaN.
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            p = tl.exp(s - m_safe[:, None])
            alpha = tl.exp(m_i - m_safe)
            l_i = l_i * alpha + tl.sum(p, 1)
            v = _tile(V + b * svb + h * svh, offs_l, svl, l_in, offs_dv, svd, DV)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
            m_i = m_new
        if COSINE:
            k_norm = _row_norms(k)
            cos = tl.dot(c, tl.trans(k), input_precision=PRECISION) / k_norm[None, :]
            first_recent = L - TOPK
            rec_ok = n_ok[:, None] & (offs_l[None, :] >= first_recent) & l_in[None, :]
            tl.store(
                Feat + (b * N + offs_n[:, None]) * (2 * TOPK) + (offs_l[None, :] - first_recent),
                tl.where(keep[None, :], cos, 0.0).to(Feat.dtype.element_ty),
                mask=rec_ok,
            )
            keys = tl.where(keep[None, :], _pack(cos, offs_l), NONE_KEY)
            # Fixed work per tile (two bitonic top-k's), no data-dependent loop: the tile's own k
            # largest, then the k largest of those and the running ones.
            tile_best = tl.topk(keys, BLOCK_K)
            best = tl.topk(tl.reshape(tl.join(best, tile_best), [BLOCK_N, 2 * BLOCK_K]), BLOCK_K)

    if ATTENTION:
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        tl.store(
            Out + b * sob + h * soh + offs_n[:, None] * son + offs_dv[None, :] * sod,
            out.to(Out.dtype.element_ty),
            mask=n_ok[:, None] & (offs_dv[None, :] < DV),
        )
        # +inf for empty rows: the backward's exp(s - lse) is then 0 everywhere.
        lse = tl.where(empty, float("inf"), m_i + tl.log(tl.where(empty, 1.0, l_i)))
        tl.store(Lse + pid_bh * N + offs_n, lse, mask=n_ok)
    if COSINE:
        value, pos = _unpack(best)
        found = best != NONE_KEY
        row = (b * N + offs_n[:, None]) * (2 * TOPK)
        slot_ok = n_ok[:, None] & (offs_k[None, :] < TOPK)
        tl.store(
            Feat + row + TOPK + offs_k[None, :],
            tl.where(found, value, 0.0).to(Feat.dtype.element_ty),
            mask=slot_ok,
        )
        tl.store(
            TopI + (b * N + offs_n[:, None]) * TOPK + offs_k[None, :], tl.where(found, pos, -1), mask=slot_ok
        )
        # Recent slots before position 0 (histories shorter than k) hold 0.
        tl.store(
            Feat + row + offs_k[None, :],
            tl.zeros([BLOCK_N, BLOCK_K], Feat.dtype.element_ty),
            mask=slot_ok & (offs_k[None, :] < TOPK - L),
        )


# ---- backward --------------------------------------------------------------------------------------
@triton.jit
def _cos_grad_tile(
    GRec, GTop, TopIs, b, offs_n, n_ok, offs_l, keep, N, L,
    TOPK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr,
):  # fmt: skip
    """d loss / d cos[n, j] for one tile: the recent-k and top-k gradients routed to their positions."""
    first_recent = L - TOPK
    rec_ok = n_ok[:, None] & (offs_l[None, :] >= first_recent) & (offs_l[None, :] < L) & keep[None, :]
    g = tl.load(
        GRec + (b * N + offs_n[:, None]) * TOPK + (offs_l[None, :] - first_recent), mask=rec_ok, other=0.0
    )
    for t in range(TOPK):
        pos = tl.load(TopIs + (b * N + offs_n) * TOPK + t, mask=n_ok, other=-1)
        gt = tl.load(GTop + (b * N + offs_n) * TOPK + t, mask=n_ok, other=0.0)
        g += tl.where(offs_l[None, :] == pos[:, None], gt[:, None], 0.0)
    return g


@triton.jit
def _bwd_kv_kernel(
    Q, K, V, Mask, C, DO, Lse, Delta, GRec, GTop, TopIs,
    DK, DV_, scale,
    sqb, sqh, sqn, sqd,
    skb, skh, skl, skd,
    svb, svh, svl, svd,
    smb, sml,
    scb, scn, scd,
    sob, soh, son, sod,
    H, N, L,
    D: tl.constexpr, DV: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ATTENTION: tl.constexpr, COSINE: tl.constexpr, TOPK: tl.constexpr, SAME_KV: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    pid_bh, pid_l = _bh_and_tile(L, BLOCK_L)
    b = pid_bh // H
    h = pid_bh % H
    offs_l = pid_l * BLOCK_L + tl.arange(0, BLOCK_L)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    l_in = offs_l < L
    keep = tl.load(Mask + b * smb + offs_l * sml, mask=l_in, other=0) != 0
    k = _tile(K + b * skb + h * skh, offs_l, skl, l_in, offs_d, skd, D)
    dk = tl.zeros([BLOCK_L, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_L, BLOCK_DV], tl.float32)
    if ATTENTION:
        v = _tile(V + b * svb + h * svh, offs_l, svl, l_in, offs_dv, svd, DV)
    if COSINE:
        dk_hat = tl.zeros([BLOCK_L, BLOCK_D], tl.float32)

    for start in range(0, N, BLOCK_N):
        offs_n = start + tl.arange(0, BLOCK_N)
        n_ok = offs_n < N
        if ATTENTION:
            q = _tile(Q + b * sqb + h * sqh, offs_n, sqn, n_ok, offs_d, sqd, D)
            do = _tile(DO + b * sob + h * soh, offs_n, son, n_ok, offs_dv, sod, DV)
            lse = tl.load(Lse + pid_bh * N + offs_n, mask=n_ok, other=float("inf"))
            delta = tl.load(Delta + pid_bh * N + offs_n, mask=n_ok, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            p = tl.where(keep[None, :], tl.exp(s - lse[:, None]), 0.0)
            dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PRECISION)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION) * scale
        if COSINE:
            c = _unit_rows(_tile(C + b * scb, offs_n, scn, n_ok, offs_d, scd, D))
            g = _cos_grad_tile(GRec, GTop, TopIs, b, offs_n, n_ok, offs_l, keep, N, L, TOPK, BLOCK_N, BLOCK_L)
            dk_hat += tl.dot(tl.trans(g.to(c.dtype)), c, input_precision=PRECISION)

    if COSINE:  # cos = c_hat . k / |k|
        dk += _through_unit(dk_hat, k)
    if SAME_KV:  # keys and values are one tensor (the history): one gradient
        dk += dv
    tl.store(
        DK + (pid_bh * L + offs_l[:, None]) * D + offs_d[None, :],
        dk.to(DK.dtype.element_ty),
        mask=l_in[:, None] & (offs_d[None, :] < D),
    )
    if ATTENTION and not SAME_KV:
        tl.store(
            DV_ + (pid_bh * L + offs_l[:, None]) * DV + offs_dv[None, :],
            dv.to(DV_.dtype.element_ty),
            mask=l_in[:, None] & (offs_dv[None, :] < DV),
        )


@triton.jit
def _bwd_q_kernel(
    Q, K, V, Mask, C, DO, Lse, Delta, GRec, GTop, TopIs,
    DQ, DC, scale,
    sqb, sqh, sqn, sqd,
    skb, skh, skl, skd,
    svb, svh, svl, svd,
    smb, sml,
    scb, scn, scd,
    sob, soh, son, sod,
    H, N, L,
    D: tl.constexpr, DV: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
    ATTENTION: tl.constexpr, COSINE: tl.constexpr, TOPK: tl.constexpr, SAME_KV: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    pid_bh, pid_n = _bh_and_tile(N, BLOCK_N)
    b = pid_bh // H
    h = pid_bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    n_ok = offs_n < N
    dq = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    if ATTENTION:
        q = _tile(Q + b * sqb + h * sqh, offs_n, sqn, n_ok, offs_d, sqd, D)
        do = _tile(DO + b * sob + h * soh, offs_n, son, n_ok, offs_dv, sod, DV)
        lse = tl.load(Lse + pid_bh * N + offs_n, mask=n_ok, other=float("inf"))
        delta = tl.load(Delta + pid_bh * N + offs_n, mask=n_ok, other=0.0)
    if COSINE:
        dc = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)

    for start in range(0, L, BLOCK_L):
        offs_l = start + tl.arange(0, BLOCK_L)
        l_in = offs_l < L
        keep = tl.load(Mask + b * smb + offs_l * sml, mask=l_in, other=0) != 0
        k = _tile(K + b * skb + h * skh, offs_l, skl, l_in, offs_d, skd, D)
        if ATTENTION:
            v = _tile(V + b * svb + h * svh, offs_l, svl, l_in, offs_dv, svd, DV)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale
            p = tl.where(keep[None, :], tl.exp(s - lse[:, None]), 0.0)
            dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k, input_precision=PRECISION) * scale
        if COSINE:
            k_norm = _row_norms(k)
            g = _cos_grad_tile(GRec, GTop, TopIs, b, offs_n, n_ok, offs_l, keep, N, L, TOPK, BLOCK_N, BLOCK_L)
            g = g / k_norm[None, :]
            dc += tl.dot(g.to(k.dtype), k, input_precision=PRECISION)

    if ATTENTION:
        tl.store(
            DQ + (pid_bh * N + offs_n[:, None]) * D + offs_d[None, :],
            dq.to(DQ.dtype.element_ty),
            mask=n_ok[:, None] & (offs_d[None, :] < D),
        )
    if COSINE:  # dc above is the gradient of c_hat = c / |c|
        dc = _through_unit(dc, _tile(C + b * scb, offs_n, scn, n_ok, offs_d, scd, D))
        tl.store(
            DC + (b * N + offs_n[:, None]) * D + offs_d[None, :],
            dc.to(DC.dtype.element_ty),
            mask=n_ok[:, None] & (offs_d[None, :] < D),
        )


# ---- launchers -------------------------------------------------------------------------------------
@dataclass
class ForwardResult:
    out: Tensor | None  # [B, H, N, DV] in q's dtype (None without attention)
    lse: Tensor | None  # [B, H, N] float32 log-sum-exp, +inf for empty rows
    features: Tensor | None  # [B, N, 2k] in c's dtype: k most recent cosines, then the k largest, descending
    top_index: Tensor | None  # [B, N, k] int32 positions of the k largest, -1 where fewer than k exist


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def _precision(dtype: torch.dtype) -> str:
    # fp32 inputs must not silently drop to tf32 (1e-3 error): "ieee" keeps float32 products.
    return "ieee" if dtype == torch.float32 else "tf32"


def _strides(x: Tensor | None, dims: int) -> tuple[int, ...]:
    return tuple(x.stride()) if x is not None else (0,) * dims


def _grid(bh: int, n_items: int, block: int) -> tuple[int]:
    """b * h times the tile count on grid axis 0, tiles fastest (decomposed by `_bh_and_tile`)."""
    return (bh * triton.cdiv(n_items, block),)


def _check_one_dtype(**tensors: Tensor | None) -> None:
    """Triton's tl.dot asserts deep inside the kernel on mixed operands; say which input differs."""
    dtypes = {name: x.dtype for name, x in tensors.items() if x is not None}
    if len(set(dtypes.values())) > 1:
        given = ", ".join(f"{name} {dtype}" for name, dtype in dtypes.items())
        raise TypeError(f"the fused attention kernels take one dtype for q, k, v and c, got {given}")


def fused_forward(
    q: Tensor | None,
    k: Tensor,
    v: Tensor | None,
    mask: Tensor,
    scale: float,
    c: Tensor | None = None,
    topk: int = 0,
    blocks: Blocks | None = None,
) -> ForwardResult:
    """q [B, H, N, D], k [B, H, L, D], v [B, H, L, DV] (any strides), mask [B, L] bool.

    With targets c [B, N, D] and topk > 0 the cosine features come too: k must then be the raw
    history (the cosines are taken against it) and H must be 1. q may be None for the features alone.
    """
    cosine = c is not None and topk > 0
    attention = q is not None
    if not (attention or cosine):
        raise ValueError("fused_forward needs queries or cosine targets")
    b, h, length, d = k.shape
    n = (q if attention else c).shape[-2]
    if cosine and h != 1:
        raise ValueError(f"cosine features take one history per request (H = 1), got H = {h}")
    _check_one_dtype(q=q, k=k, v=v, c=c if cosine else None)
    dv = v.shape[-1] if attention else d
    blocks = blocks or default_blocks(d, k.device)
    block_k = triton.next_power_of_2(max(topk, 1))
    dev = k.device
    out = torch.empty(b, h, n, dv, dtype=q.dtype, device=dev) if attention else None
    lse = torch.empty(b, h, n, dtype=torch.float32, device=dev) if attention else None
    feat = torch.empty(b, n, 2 * topk, dtype=c.dtype, device=dev) if cosine else None
    top_i = torch.empty(b, n, topk, dtype=torch.int32, device=dev) if cosine else None
    dummy = k.new_empty(1)
    qq, vv = (q, v) if attention else (k, k)
    _fwd_kernel[_grid(b * h, n, blocks.n)](
        qq, k, vv, mask.view(torch.uint8), c if cosine else dummy,
        out if attention else dummy, lse if attention else dummy,
        feat if cosine else dummy, top_i if cosine else dummy,
        scale,
        *qq.stride(), *k.stride(), *vv.stride(), *mask.stride(), *_strides(c if cosine else None, 3),
        *_strides(out, 4),
        h, n, length,
        D=d, DV=dv, BLOCK_N=blocks.n, BLOCK_L=max(blocks.l, block_k), BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv),
        ATTENTION=attention, COSINE=cosine, TOPK=max(topk, 1), BLOCK_K=block_k,
        PRECISION=_precision(k.dtype), num_warps=blocks.warps, num_stages=blocks.stages,
    )  # fmt: skip
    return ForwardResult(out, lse, feat, top_i)


@dataclass
class BackwardResult:
    dq: Tensor | None  # [B, H, N, D] in q's dtype
    dk: Tensor  # [B, H, L, D] in k's dtype (plus dv when same_kv; plus the cosine gradient with c)
    dv: Tensor | None  # [B, H, L, DV] in v's dtype (None when same_kv)
    dc: Tensor | None  # [B, N, D] in c's dtype


def fused_backward(
    q: Tensor | None,
    k: Tensor,
    v: Tensor | None,
    mask: Tensor,
    scale: float,
    out: Tensor | None,
    lse: Tensor | None,
    grad_out: Tensor | None,
    c: Tensor | None = None,
    grad_features: Tensor | None = None,
    top_index: Tensor | None = None,
    same_kv: bool = False,
    blocks: Blocks | None = None,
) -> BackwardResult:
    """Gradients of `fused_forward`: grad_out [B, H, N, DV]; grad_features [B, N, 2k] with the
    positions top_index [B, N, k] (int32, -1 = none) the ranked half was read at. `same_kv`: k and v
    are the same tensor, and dk carries both gradients."""
    attention = q is not None
    cosine = c is not None and top_index is not None
    _check_one_dtype(q=q, k=k, v=v, c=c if cosine else None)
    b, h, length, d = k.shape
    n = (q if attention else c).shape[-2]
    dv_dim = v.shape[-1] if attention else d
    blocks = blocks or default_blocks(d, k.device, backward=True)
    dev = k.device
    dummy = k.new_empty(1)
    topk = top_index.shape[-1] if cosine else 1
    if attention:
        delta = (grad_out.float() * out.float()).sum(-1)
    dq = torch.empty(b, h, n, d, dtype=q.dtype, device=dev) if attention else dummy
    dk = torch.empty(b, h, length, d, dtype=k.dtype, device=dev)
    separate_dv = attention and not same_kv
    dvv = torch.empty(b, h, length, dv_dim, dtype=v.dtype, device=dev) if separate_dv else dummy
    dc = torch.empty(b, n, d, dtype=c.dtype, device=dev) if cosine else dummy
    qq, vv, do = (q, v, grad_out.to(q.dtype)) if attention else (k, k, k)
    common = dict(
        D=d, DV=dv_dim, BLOCK_N=blocks.n, BLOCK_L=blocks.l, BLOCK_D=_pow2(d), BLOCK_DV=_pow2(dv_dim),
        ATTENTION=attention, COSINE=cosine, TOPK=topk, SAME_KV=attention and same_kv,
        PRECISION=_precision(k.dtype), num_warps=blocks.warps, num_stages=blocks.stages,
    )  # fmt: skip
    g_feat = grad_features.float() if cosine else None
    args = (
        qq, k, vv, mask.view(torch.uint8), c if cosine else dummy, do,
        lse if attention else dummy, delta if attention else dummy,
        g_feat[..., :topk].contiguous() if cosine else dummy,
        g_feat[..., topk:].contiguous() if cosine else dummy,
        top_index.contiguous() if cosine else dummy,
    )  # fmt: skip
    strides = (
        *qq.stride(), *k.stride(), *vv.stride(), *mask.stride(), *_strides(c if cosine else None, 3),
        *_strides(do if attention else None, 4),
    )  # fmt: skip
    _bwd_kv_kernel[_grid(b * h, length, blocks.l)](*args, dk, dvv, scale, *strides, h, n, length, **common)
    _bwd_q_kernel[_grid(b * h, n, blocks.n)](*args, dq, dc, scale, *strides, h, n, length, **common)
    return BackwardResult(dq if attention else None, dk, dvv if separate_dv else None, dc if cosine else None)
