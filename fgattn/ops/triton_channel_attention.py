"""Fused channel attention softmax(scale · q kᵀ) v over the channel axis, in Triton.

q, k: (B, C, L); v: (B, C, Lv) with any Lv (CoAttention passes [F1 | F2]). Flash-attention with
C channels as the sequence and L as the head dim: the C x C matrix is never written. The forward
keeps the per-row log-sum-exp; the backward recomputes the probabilities from it (a first pass
gets the row sums δ = Σ_j p_ij dp_ij, then the gradient kernels).

Numerics: logits and softmax in fp32, the row max taken AFTER scaling (the scale is negative by
default, so a max of the raw scores would be the wrong end); tl.dot accumulates in fp32; fp16/bf16
feed the tensor cores in their own dtype (p and ds are cast to it, as flash attention does); fp32
uses exact fp32 unless TF32 is enabled (`torch.backends.cuda.matmul.allow_tf32`).

Self attention (q = k = v = X, SCI) has its own op: the logits are symmetric, so one backward
program owning rows n of dX gets dq, dk and dv from one recomputed logit tile:
    dX_n = scale · Σ_m (ds_nm + ds_mn) x_m + Σ_m p_mn do_m,
    ds = p ∘ (do xᵀ − δ),  δ_i = Σ_j p_ij dp_ij,
which takes 5 tile products per (m, n) block instead of 7 and writes one gradient instead of three
(plus 2 per block in the δ pass, both cases).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._triton_common import (
    TILES,
    check_device,
    chunk,
    device_guard,
    dot_rows,
    fused_op,
    load_tile,
    one_dtype,
    precision,
    probs,
    store_tile,
    tile,
    warps,
)

# ----------------------------------------------------------------------------------------------
# Kernels


@triton.jit
def row_stats(BST, offs, C):
    """(max, log Σ, δ) of rows `offs` from one batch's (3, C) block of backward row statistics."""
    mask = offs < C
    m = tl.load(BST + offs, mask=mask, other=0.0)
    lo = tl.load(BST + C + offs, mask=mask, other=0.0)
    delta = tl.load(BST + 2 * C + offs, mask=mask, other=0.0)
    return m, lo, delta


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, STATS,
    C, L, LV, scale,
    sqb, sqc, sql, skb, skc, skl, svb, svc, svl, sob, soc, sol,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_DV: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # grid: (row blocks of q, column tiles of v, batch)
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    Q += b * sqb
    K += b * skb
    V += b * svb
    Out += b * sob
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_DV), dtype=tl.float32)
    for n0 in range(0, C, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s = dot_rows(Q, K, offs_m, offs_n, C, L, sqc, sql, skc, skl,
                     BLOCK_M, BLOCK_N, BLOCK_K, PRECISION) * scale  # fmt: skip
        s = tl.where(offs_n[None, :] < C, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))  # max of the SCALED logits
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = load_tile(V, offs_n, offs_d, C, LV, svc, svl)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    store_tile(Out, acc / l_i[:, None], offs_m, offs_d, C, LV, soc, sol)
    # Every column tile computes the same statistics; the first one writes them.
    if pid_d == 0:
        # lse kept as the pair (max, log Σ): with |logits| ~ 1e4 a single fp32 m + log l would
        # round log l to ~1e-3 and leave the recomputed p unnormalised by as much.
        tl.store(STATS + b * 2 * C + offs_m, m_i, mask=offs_m < C)
        tl.store(STATS + b * 2 * C + C + offs_m, tl.log(l_i), mask=offs_m < C)


@triton.jit
def _bwd_delta_kernel(
    Q, K, V, DO, STATS, BST,
    C, L, LV, scale,
    sqb, sqc, sql, skb, skc, skl, svb, svc, svl, sdb, sdc, sdl,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_KV: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # grid: (row blocks, batch). δ_i = Σ_j p_ij dp_ij from the recomputed p and dp, not do_i · o_i:
    # with |x| ≈ 30 and a peaked softmax, dp − δ cancels to a tiny difference of ~1e2-sized
    # numbers, and the rounding of the stored o (bf16!) would swamp it. The same p, dp as the
    # gradient kernels compute make the cancellation exact as in the reference's softmax backward.
    # It also renormalises: r_i = Σ_j p_ij (1 up to rounding of the recomputed logits) goes into
    # the log-normaliser, so the gradient is exactly that of the softmax the backward recomputes.
    # Writes BST (B, 3, C) = [max, log Σ, δ] for the gradient kernels.
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    Q += b * sqb
    K += b * skb
    V += b * svb
    DO += b * sdb
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_i = tl.load(STATS + b * 2 * C + offs_m, mask=offs_m < C, other=0.0)
    lo = tl.load(STATS + b * 2 * C + C + offs_m, mask=offs_m < C, other=0.0)
    num = tl.zeros((BLOCK_M,), dtype=tl.float32)
    r = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, C, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s = dot_rows(Q, K, offs_m, offs_n, C, L, sqc, sql, skc, skl,
                     BLOCK_M, BLOCK_N, BLOCK_K, PRECISION) * scale  # fmt: skip
        p = probs(s, m_i[:, None], lo[:, None], offs_n[None, :] < C)
        dp = dot_rows(DO, V, offs_m, offs_n, C, LV, sdc, sdl, svc, svl,
                      BLOCK_M, BLOCK_N, BLOCK_KV, PRECISION)  # fmt: skip
        num += tl.sum(p * dp, 1)
        r += tl.sum(p, 1)
    BST += b * 3 * C
    tl.store(BST + offs_m, m_i, mask=offs_m < C)
    tl.store(BST + C + offs_m, lo + tl.log(r), mask=offs_m < C)
    tl.store(BST + 2 * C + offs_m, num / r, mask=offs_m < C)


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DO, BST, DQ,
    C, L, LV, scale,
    sqb, sqc, sql, skb, skc, skl, svb, svc, svl, sdb, sdc, sdl, sgb, sgc, sgl,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_KV: tl.constexpr, BLOCK_DL: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # grid: (row blocks of dq, column tiles of dq over L, batch); dq = scale · ds k
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    Q += b * sqb
    K += b * skb
    V += b * svb
    DO += b * sdb
    DQ += b * sgb
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = pid_d * BLOCK_DL + tl.arange(0, BLOCK_DL)
    m_i, lo, delta = row_stats(BST + b * 3 * C, offs_m, C)

    acc = tl.zeros((BLOCK_M, BLOCK_DL), dtype=tl.float32)
    for n0 in range(0, C, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s = dot_rows(Q, K, offs_m, offs_n, C, L, sqc, sql, skc, skl,
                     BLOCK_M, BLOCK_N, BLOCK_K, PRECISION) * scale  # fmt: skip
        p = probs(s, m_i[:, None], lo[:, None], offs_n[None, :] < C)
        dp = dot_rows(DO, V, offs_m, offs_n, C, LV, sdc, sdl, svc, svl,
                      BLOCK_M, BLOCK_N, BLOCK_KV, PRECISION)  # fmt: skip
        ds = p * (dp - delta[:, None])
        k = load_tile(K, offs_n, offs_d, C, L, skc, skl)
        acc = tl.dot(ds.to(k.dtype), k, acc, input_precision=PRECISION)
    store_tile(DQ, acc * scale, offs_m, offs_d, C, L, sgc, sgl)


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DO, BST, DK, DV,
    C, L, LV, scale,
    sqb, sqc, sql, skb, skc, skl, svb, svc, svl, sdb, sdc, sdl,
    skgb, skgc, skgl, svgb, svgc, svgl,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_KV: tl.constexpr, BLOCK_DL: tl.constexpr, BLOCK_DV: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    # grid: (row blocks n of dk/dv, column tile j, batch); tile j of dv (if j < #dv tiles) and of
    # dk (if j < #dk tiles) from one recomputed pᵀ. Works in the transposed [n, m] layout so no
    # tile needs a register transpose: sᵀ = k_n q_mᵀ, dv_n = Σ_m pᵀ do_m, dk_n = scale Σ_m dsᵀ q_m.
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    Q += b * sqb
    K += b * skb
    V += b * svb
    DO += b * sdb
    DK += b * skgb
    DV += b * svgb
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_dl = pid_d * BLOCK_DL + tl.arange(0, BLOCK_DL)
    offs_dv = pid_d * BLOCK_DV + tl.arange(0, BLOCK_DV)
    want_dk = pid_d * BLOCK_DL < L
    want_dv = pid_d * BLOCK_DV < LV

    acc_dk = tl.zeros((BLOCK_N, BLOCK_DL), dtype=tl.float32)
    acc_dv = tl.zeros((BLOCK_N, BLOCK_DV), dtype=tl.float32)
    for m0 in range(0, C, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        m_m, lo_m, delta = row_stats(BST + b * 3 * C, offs_m, C)
        st = dot_rows(K, Q, offs_n, offs_m, C, L, skc, skl, sqc, sql,
                      BLOCK_N, BLOCK_M, BLOCK_K, PRECISION) * scale  # fmt: skip
        valid = (offs_n[:, None] < C) & (offs_m[None, :] < C)  # padding: exp(0 − lse) = inf
        pt = probs(st, m_m[None, :], lo_m[None, :], valid)
        if want_dv:
            do = load_tile(DO, offs_m, offs_dv, C, LV, sdc, sdl)
            acc_dv = tl.dot(pt.to(do.dtype), do, acc_dv, input_precision=PRECISION)
        if want_dk:
            dpt = dot_rows(V, DO, offs_n, offs_m, C, LV, svc, svl, sdc, sdl,
                           BLOCK_N, BLOCK_M, BLOCK_KV, PRECISION)  # fmt: skip
            dst = pt * (dpt - delta[None, :])
            q = load_tile(Q, offs_m, offs_dl, C, L, sqc, sql)
            acc_dk = tl.dot(dst.to(q.dtype), q, acc_dk, input_precision=PRECISION)
    store_tile(DK, acc_dk * scale, offs_n, offs_dl, C, L, skgc, skgl)
    store_tile(DV, acc_dv, offs_n, offs_dv, C, LV, svgc, svgl)


@triton.jit
def _bwd_self_kernel(
    X, DO, BST, DX,
    C, L, scale,
    sxb, sxc, sxl, sdb, sdc, sdl, sgb, sgc, sgl,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_DL: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # q = k = v = X. Program owns rows n of dX (one column tile). In the [n, m] layout:
    #   st[n, m] = s_mn = s_nm (symmetric logits, computed once)
    #   pt[n, m] = p_mn = exp(s_mn − lse_m)        p_nm = exp(s_nm − lse_n)
    #   dpt[n, m] = do_m · x_n = dp_mn             dp_nm = do_n · x_m
    #   dX_n = scale Σ_m (ds_mn + ds_nm) x_m + Σ_m p_mn do_m
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    X += b * sxb
    DO += b * sdb
    DX += b * sgb
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = pid_d * BLOCK_DL + tl.arange(0, BLOCK_DL)
    m_n, lo_n, delta_n = row_stats(BST + b * 3 * C, offs_n, C)

    acc = tl.zeros((BLOCK_N, BLOCK_DL), dtype=tl.float32)
    for m0 in range(0, C, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        # Padding rows/columns would give exp(0 − lse) = inf with lse ≪ 0: mask both.
        valid = (offs_n[:, None] < C) & (offs_m[None, :] < C)
        m_m, lo_m, delta_m = row_stats(BST + b * 3 * C, offs_m, C)
        st = dot_rows(X, X, offs_n, offs_m, C, L, sxc, sxl, sxc, sxl,
                      BLOCK_N, BLOCK_M, BLOCK_K, PRECISION) * scale  # fmt: skip
        pt = probs(st, m_m[None, :], lo_m[None, :], valid)
        p = probs(st, m_n[:, None], lo_n[:, None], valid)
        dpt = dot_rows(X, DO, offs_n, offs_m, C, L, sxc, sxl, sdc, sdl,
                       BLOCK_N, BLOCK_M, BLOCK_K, PRECISION)  # fmt: skip
        dp = dot_rows(DO, X, offs_n, offs_m, C, L, sdc, sdl, sxc, sxl,
                      BLOCK_N, BLOCK_M, BLOCK_K, PRECISION)  # fmt: skip
        ds = (pt * (dpt - delta_m[None, :]) + p * (dp - delta_n[:, None])) * scale
        x = load_tile(X, offs_m, offs_d, C, L, sxc, sxl)
        do = load_tile(DO, offs_m, offs_d, C, L, sdc, sdl)
        acc = tl.dot(ds.to(x.dtype), x, acc, input_precision=PRECISION)
        acc = tl.dot(pt.to(do.dtype), do, acc, input_precision=PRECISION)
    store_tile(DX, acc, offs_n, offs_d, C, L, sgc, sgl)


# ----------------------------------------------------------------------------------------------
# Launchers (plain functions on real tensors)


def _forward_unguarded(q, k, v, scale: float, tf32: bool):
    check_device(q, k, v)
    bsz, c, length = q.shape
    lv = v.shape[2]
    o = torch.empty((bsz, c, lv), device=v.device, dtype=v.dtype)
    stats = torch.empty((bsz, 2, c), device=q.device, dtype=torch.float32)
    bm, bn, bdv = TILES["block_m"], TILES["block_n"], tile(lv, v)
    grid = (triton.cdiv(c, bm), triton.cdiv(lv, bdv), bsz)
    _fwd_kernel[grid](
        q, k, v, o, stats, c, length, lv, scale,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=chunk(length), BLOCK_DV=bdv,
        PRECISION=precision(q, tf32), num_warps=warps(bdv), num_stages=2,
    )  # fmt: skip
    return o, stats


def _forward(q, k, v, scale: float, tf32: bool):
    with device_guard(q):
        return _forward_unguarded(q, k, v, scale, tf32)


def _delta(do, q, k, v, stats, scale: float, prec: str):
    """(B, 3, C) fp32 [max, log Σ, δ_i = Σ_j p_ij dp_ij] (see _bwd_delta_kernel)."""
    bsz, c, length = q.shape
    lv = v.shape[2]
    bst = torch.empty((bsz, 3, c), device=q.device, dtype=torch.float32)
    bm = TILES["block_m"]
    _bwd_delta_kernel[(triton.cdiv(c, bm), bsz)](
        q, k, v, do, stats, bst, c, length, lv, scale,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(),
        BLOCK_M=bm, BLOCK_N=TILES["block_n"], BLOCK_K=chunk(length), BLOCK_KV=chunk(lv),
        PRECISION=prec, num_warps=4, num_stages=2,
    )  # fmt: skip
    return bst


def _backward_unguarded(do, q, k, v, stats, scale: float, tf32: bool):
    check_device(do, q, k, v)
    bsz, c, length = q.shape
    lv = v.shape[2]
    prec = precision(q, tf32)
    bst = _delta(do, q, k, v, stats, scale, prec)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    bm, bn = TILES["block_m"], TILES["block_n"]
    bk, bkv, bdl, bdv = chunk(length), chunk(lv), tile(length, q), tile(lv, v)
    _bwd_dq_kernel[(triton.cdiv(c, bm), triton.cdiv(length, bdl), bsz)](
        q, k, v, do, bst, dq, c, length, lv, scale,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_KV=bkv, BLOCK_DL=bdl,
        PRECISION=prec, num_warps=warps(bdl), num_stages=2,
    )  # fmt: skip
    n_tiles = max(triton.cdiv(length, bdl), triton.cdiv(lv, bdv))
    _bwd_dkdv_kernel[(triton.cdiv(c, bn), n_tiles, bsz)](
        q, k, v, do, bst, dk, dv, c, length, lv, scale,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_KV=bkv, BLOCK_DL=bdl, BLOCK_DV=bdv,
        PRECISION=prec, num_warps=warps(bdl, bdv), num_stages=2,
    )  # fmt: skip
    return dq, dk, dv


def _backward(do, q, k, v, stats, scale: float, tf32: bool):
    with device_guard(q):
        return _backward_unguarded(do, q, k, v, stats, scale, tf32)


def _backward_self_unguarded(do, x, stats, scale: float, tf32: bool):
    check_device(do, x)
    bsz, c, length = x.shape
    bst = _delta(do, x, x, x, stats, scale, precision(x, tf32))
    dx = torch.empty_like(x)
    bm, bn, bdl = TILES["block_m"], TILES["block_n"], tile(length, x)
    _bwd_self_kernel[(triton.cdiv(c, bn), triton.cdiv(length, bdl), bsz)](
        x, do, bst, dx, c, length, scale,
        *x.stride(), *do.stride(), *dx.stride(),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=chunk(length), BLOCK_DL=bdl,
        PRECISION=precision(x, tf32), num_warps=warps(bdl), num_stages=2,
    )  # fmt: skip
    return dx


def _backward_self(do, x, stats, scale: float, tf32: bool):
    with device_guard(x):
        return _backward_self_unguarded(do, x, stats, scale, tf32)


# ----------------------------------------------------------------------------------------------
# Custom ops (`fused_op`: schema, fake and autograd) and entry points


def _forward_self(x, scale: float, tf32: bool):
    return _forward(x, x, x, scale, tf32)


channel_attention_fwd, channel_attention_bwd = fused_op(
    "channel_attention", ("q", "k", "v"), _forward, _backward, value=2
)
self_channel_attention_fwd, self_channel_attention_bwd = fused_op(
    "self_channel_attention", ("x",), _forward_self, _backward_self
)


def self_attention(x: torch.Tensor, scale: float, tf32: bool = False) -> torch.Tensor:
    """softmax(scale · x xᵀ) x on (B, C, L), one fused gradient for q = k = v."""
    return self_channel_attention_fwd(x, scale, tf32)[0]


def channel_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, tf32: bool = False
) -> torch.Tensor:
    """softmax(scale · q kᵀ) v on (B, C, L) tensors, result in v's dtype."""
    return channel_attention_fwd(*one_dtype(q, k, v), scale, tf32)[0].to(v.dtype)
