"""The "triton_tiled" implementation: fgattn's first fused Triton kernels, for any L.

softmax(scale · q kᵀ) v over the channel axis, and the contrastive |P_A − η P_B| X_A (CIN eq. 5),
with q, k, x_a, x_b: (B, C, L), v: (B, C, Lv), any L and Lv. Flash attention with the C channels as
the sequence and L as the head dim: the C x C matrix is never written. Tiles by rule
(`tuning.TILES`, `tuning.tile`, `tuning.chunk`): a program owns BLOCK_M rows and one column tile
of the output (at most 256 wide, narrower where the GPU's shared memory is smaller), reloads q
for every block of BLOCK_N columns of the logits, and loops over L in chunks.

Numerics: logits and softmax in fp32, the row max taken AFTER scaling (the scale is negative by
default, so a max of the raw scores would be the wrong end); tl.dot accumulates in fp32; fp16/bf16
feed the tensor cores in their own dtype (p and ds are cast to it, as flash attention does); fp32
uses exact fp32 unless TF32 is enabled (`torch.backends.cuda.matmul.allow_tf32`). The forward keeps
each row's log-sum-exp as the pair (max, log Σ); the backward recomputes the probabilities from it.

Self attention (q = k = v = X, SCI) has its own op: the logits are symmetric, so one backward
program owning rows n of dX gets dq, dk and dv from one recomputed logit tile:
    dX_n = scale · Σ_m (ds_nm + ds_mn) x_m + Σ_m p_mn do_m,
    ds = p ∘ (do xᵀ − δ),  δ_i = Σ_j p_ij dp_ij,
5 tile products per (m, n) block instead of 7, one gradient written instead of three.

The contrastive op (g = dOut, rows i, j, k index channels, W = P_A − η P_B, G = sign(W) with
sign(0) = 0, which is PyTorch's d|u|/du at 0):
    out_i = Σ_j |W_ij| a_j                      ⇒  dA (value path) = |W|ᵀ g
    D_ij  = g_i · a_j,   dW = G ∘ D,   dP_A = dW,   dP_B = −η dW
    dS_A = P_A ∘ (G∘D − δ),   dS_B = −η P_B ∘ (G∘D − ε),   dη = −Σ_i ε_i,
        δ_i = Σ_k P_A,ik G_ik D_ik,   ε_i = Σ_k P_B,ik G_ik D_ik
    dA = |W|ᵀ g + s (dS_A + dS_Aᵀ) A,   dB = s (dS_B + dS_Bᵀ) B
The |·| sits between the softmax and the product, so the online-softmax rescaling does not apply:
the forward is two passes (the row statistics of both softmaxes, then |P_A − η P_B| X_A from the
recomputed, normalised tiles), and δ is not rowsum(g ∘ out): a third pass computes δ and ε.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..call import FLOATS, Call, Limits
from . import tuning
from .language import (
    backward_stats,
    dot_rows,
    load_tile,
    probs,
    row_stats,
    sign,
    store_backward_stats,
    store_tile,
)
from .library import custom_op_pair, devices, gradient_buffers, launcher, one_dtype, tf32
from .tuning import chunk, precision, tile, warps

LIMITS = Limits(devices(), FLOATS)


def refusal(call: Call) -> str | None:
    """Why these kernels cannot run `call` (None: they can): CUDA (or the interpreter), fp16,
    bf16 or fp32, any L; their tiles shrink to fit any GPU's shared memory."""
    return LIMITS.refusal(call)


# ----------------------------------------------------------------------------------------------
# Kernels: channel attention


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
    store_backward_stats(BST + b * 3 * C, offs_m, C, m_i, lo, num, r)


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
    m_i, lo, delta = backward_stats(BST + b * 3 * C, offs_m, C)

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
        m_m, lo_m, delta = backward_stats(BST + b * 3 * C, offs_m, C)
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
    m_n, lo_n, delta_n = backward_stats(BST + b * 3 * C, offs_n, C)

    acc = tl.zeros((BLOCK_N, BLOCK_DL), dtype=tl.float32)
    for m0 in range(0, C, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        # Padding rows/columns would give exp(0 − lse) = inf with lse ≪ 0: mask both.
        valid = (offs_n[:, None] < C) & (offs_m[None, :] < C)
        m_m, lo_m, delta_m = backward_stats(BST + b * 3 * C, offs_m, C)
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
# Kernels: contrastive channel attention


@triton.jit
def _lse_kernel(
    X, LSE, C, L, scale, sxb, sxc, sxl,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # grid: (row blocks, batch). Row log-sum-exp of scale · X Xᵀ, max taken after scaling.
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    X += b * sxb
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, C, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s = dot_rows(X, X, offs_m, offs_n, C, L, sxc, sxl, sxc, sxl,
                     BLOCK_M, BLOCK_N, BLOCK_K, PRECISION) * scale  # fmt: skip
        s = tl.where(offs_n[None, :] < C, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        l_i = l_i * tl.exp(m_i - m_new) + tl.sum(tl.exp(s - m_new[:, None]), 1)
        m_i = m_new
    tl.store(LSE + b * 2 * C + offs_m, m_i, mask=offs_m < C)
    tl.store(LSE + b * 2 * C + C + offs_m, tl.log(l_i), mask=offs_m < C)


@triton.jit
def _contrastive_fwd_kernel(
    XA, XB, ETA, LSEA, LSEB, Out,
    C, L, scale,
    sab, sac, sal, sbb, sbc, sbl, sob, soc, sol,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_DL: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # grid: (row blocks, column tiles over L, batch)
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    XA += b * sab
    XB += b * sbb
    Out += b * sob
    eta = tl.load(ETA + b).to(tl.float32)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = pid_d * BLOCK_DL + tl.arange(0, BLOCK_DL)
    ma, la = row_stats(LSEA + b * 2 * C, offs_m, C)
    mb, lb = row_stats(LSEB + b * 2 * C, offs_m, C)
    acc = tl.zeros((BLOCK_M, BLOCK_DL), dtype=tl.float32)
    for n0 in range(0, C, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s_a = dot_rows(XA, XA, offs_m, offs_n, C, L, sac, sal, sac, sal,
                       BLOCK_M, BLOCK_N, BLOCK_K, PRECISION) * scale  # fmt: skip
        s_b = dot_rows(XB, XB, offs_m, offs_n, C, L, sbc, sbl, sbc, sbl,
                       BLOCK_M, BLOCK_N, BLOCK_K, PRECISION) * scale  # fmt: skip
        valid = offs_n[None, :] < C  # padding columns: exp(0 − max) would overflow
        p_a = probs(s_a, ma[:, None], la[:, None], valid)
        p_b = probs(s_b, mb[:, None], lb[:, None], valid)
        w = tl.abs(p_a - eta * p_b)
        a = load_tile(XA, offs_n, offs_d, C, L, sac, sal)
        acc = tl.dot(w.to(a.dtype), a, acc, input_precision=PRECISION)
    store_tile(Out, acc, offs_m, offs_d, C, L, soc, sol)


@triton.jit
def _contrastive_rowsum_kernel(
    XA, XB, G, ETA, LSEA, LSEB, DELTA, EPS,
    C, L, scale,
    sab, sac, sal, sbb, sbc, sbl, sgb, sgc, sgl,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    PRECISION: tl.constexpr,
):  # fmt: skip
    # grid: (row blocks, batch). δ_i = Σ_k P_A,ik G_ik D_ik and ε_i = Σ_k P_B,ik G_ik D_ik.
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    XA += b * sab
    XB += b * sbb
    G += b * sgb
    eta = tl.load(ETA + b).to(tl.float32)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    ma, la = row_stats(LSEA + b * 2 * C, offs_m, C)
    mb, lb = row_stats(LSEB + b * 2 * C, offs_m, C)
    delta = tl.zeros((BLOCK_M,), dtype=tl.float32)
    eps = tl.zeros((BLOCK_M,), dtype=tl.float32)
    for n0 in range(0, C, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        s_a = dot_rows(XA, XA, offs_m, offs_n, C, L, sac, sal, sac, sal,
                       BLOCK_M, BLOCK_N, BLOCK_K, PRECISION) * scale  # fmt: skip
        s_b = dot_rows(XB, XB, offs_m, offs_n, C, L, sbc, sbl, sbc, sbl,
                       BLOCK_M, BLOCK_N, BLOCK_K, PRECISION) * scale  # fmt: skip
        d = dot_rows(G, XA, offs_m, offs_n, C, L, sgc, sgl, sac, sal,
                     BLOCK_M, BLOCK_N, BLOCK_K, PRECISION)  # fmt: skip
        valid = offs_n[None, :] < C  # padding columns: exp(0 − max) would overflow
        p_a = probs(s_a, ma[:, None], la[:, None], valid)
        p_b = probs(s_b, mb[:, None], lb[:, None], valid)
        gd = sign(p_a - eta * p_b) * d
        delta += tl.sum(p_a * gd, 1)
        eps += tl.sum(p_b * gd, 1)
    tl.store(DELTA + b * C + offs_m, delta, mask=offs_m < C)
    tl.store(EPS + b * C + offs_m, eps, mask=offs_m < C)


@triton.jit
def _contrastive_bwd_kernel(
    XA, XB, G, ETA, LSEA, LSEB, DELTA, EPS, DA, DB,
    C, L, scale,
    sab, sac, sal, sbb, sbc, sbl, sgb, sgc, sgl, sdab, sdac, sdal, sdbb, sdbc, sdbl,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_DL: tl.constexpr, PRECISION: tl.constexpr,
):  # fmt: skip
    # grid: (row blocks n of dA/dB, column tiles over L, batch). All [n, m] tiles:
    #   "mn" terms belong to rows m (their lse/δ/ε), "nm" terms to rows n; the logits are
    #   symmetric so s_mn = s_nm comes from one product per matrix.
    pid_n = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    XA += b * sab
    XB += b * sbb
    G += b * sgb
    DA += b * sdab
    DB += b * sdbb
    eta = tl.load(ETA + b).to(tl.float32)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = pid_d * BLOCK_DL + tl.arange(0, BLOCK_DL)
    ma_n, la_n = row_stats(LSEA + b * 2 * C, offs_n, C)
    mb_n, lb_n = row_stats(LSEB + b * 2 * C, offs_n, C)
    delta_n = tl.load(DELTA + b * C + offs_n, mask=offs_n < C, other=0.0)
    eps_n = tl.load(EPS + b * C + offs_n, mask=offs_n < C, other=0.0)

    acc_a = tl.zeros((BLOCK_N, BLOCK_DL), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N, BLOCK_DL), dtype=tl.float32)
    for m0 in range(0, C, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        # Padding rows/columns would give exp(0 − lse) = inf with lse ≪ 0: mask both.
        valid = (offs_n[:, None] < C) & (offs_m[None, :] < C)
        ma_m, la_m = row_stats(LSEA + b * 2 * C, offs_m, C)
        mb_m, lb_m = row_stats(LSEB + b * 2 * C, offs_m, C)
        delta_m = tl.load(DELTA + b * C + offs_m, mask=offs_m < C, other=0.0)
        eps_m = tl.load(EPS + b * C + offs_m, mask=offs_m < C, other=0.0)
        s_a = dot_rows(XA, XA, offs_n, offs_m, C, L, sac, sal, sac, sal,
                       BLOCK_N, BLOCK_M, BLOCK_K, PRECISION) * scale  # fmt: skip
        s_b = dot_rows(XB, XB, offs_n, offs_m, C, L, sbc, sbl, sbc, sbl,
                       BLOCK_N, BLOCK_M, BLOCK_K, PRECISION) * scale  # fmt: skip
        d_mn = dot_rows(XA, G, offs_n, offs_m, C, L, sac, sal, sgc, sgl,
                        BLOCK_N, BLOCK_M, BLOCK_K, PRECISION)  # [n, m] = g_m · a_n  # fmt: skip
        d_nm = dot_rows(G, XA, offs_n, offs_m, C, L, sgc, sgl, sac, sal,
                        BLOCK_N, BLOCK_M, BLOCK_K, PRECISION)  # [n, m] = g_n · a_m  # fmt: skip
        # rows m
        pa_mn = probs(s_a, ma_m[None, :], la_m[None, :], valid)
        pb_mn = probs(s_b, mb_m[None, :], lb_m[None, :], valid)
        w_mn = pa_mn - eta * pb_mn
        gd_mn = sign(w_mn) * d_mn
        # rows n
        pa_nm = probs(s_a, ma_n[:, None], la_n[:, None], valid)
        pb_nm = probs(s_b, mb_n[:, None], lb_n[:, None], valid)
        gd_nm = sign(pa_nm - eta * pb_nm) * d_nm
        ds_a = pa_mn * (gd_mn - delta_m[None, :]) + pa_nm * (gd_nm - delta_n[:, None])
        ds_b = pb_mn * (gd_mn - eps_m[None, :]) + pb_nm * (gd_nm - eps_n[:, None])
        ds_a = ds_a * scale
        ds_b = ds_b * (-eta * scale)
        abs_w = tl.abs(w_mn)
        a = load_tile(XA, offs_m, offs_d, C, L, sac, sal)
        g = load_tile(G, offs_m, offs_d, C, L, sgc, sgl)
        xb = load_tile(XB, offs_m, offs_d, C, L, sbc, sbl)
        acc_a = tl.dot(abs_w.to(g.dtype), g, acc_a, input_precision=PRECISION)
        acc_a = tl.dot(ds_a.to(a.dtype), a, acc_a, input_precision=PRECISION)
        acc_b = tl.dot(ds_b.to(xb.dtype), xb, acc_b, input_precision=PRECISION)
    store_tile(DA, acc_a, offs_n, offs_d, C, L, sdac, sdal)
    store_tile(DB, acc_b, offs_n, offs_d, C, L, sdbc, sdbl)


# ----------------------------------------------------------------------------------------------
# Launchers (plain functions on real tensors)


@launcher
def _forward(q, k, v, scale: float, tf32: bool):
    bsz, c, length = q.shape
    lv = v.shape[2]
    o = torch.empty((bsz, c, lv), device=v.device, dtype=v.dtype)
    stats = torch.empty((bsz, 2, c), device=q.device, dtype=torch.float32)
    bm, bn, bdv = tuning.TILES["block_m"], tuning.TILES["block_n"], tile(lv, v)
    grid = (triton.cdiv(c, bm), triton.cdiv(lv, bdv), bsz)
    _fwd_kernel[grid](
        q, k, v, o, stats, c, length, lv, scale,
        *q.stride(), *k.stride(), *v.stride(), *o.stride(),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=chunk(length), BLOCK_DV=bdv,
        PRECISION=precision(q, tf32), num_warps=warps(bdv), num_stages=2,
    )  # fmt: skip
    return o, stats


def _delta(do, q, k, v, stats, scale: float, prec: str):
    """(B, 3, C) fp32 [max, log Σ, δ_i = Σ_j p_ij dp_ij] (see _bwd_delta_kernel)."""
    bsz, c, length = q.shape
    lv = v.shape[2]
    bst = torch.empty((bsz, 3, c), device=q.device, dtype=torch.float32)
    bm = tuning.TILES["block_m"]
    _bwd_delta_kernel[(triton.cdiv(c, bm), bsz)](
        q, k, v, do, stats, bst, c, length, lv, scale,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(),
        BLOCK_M=bm, BLOCK_N=tuning.TILES["block_n"], BLOCK_K=chunk(length), BLOCK_KV=chunk(lv),
        PRECISION=prec, num_warps=4, num_stages=2,
    )  # fmt: skip
    return bst


@launcher
def _backward(do, q, k, v, stats, scale: float, tf32: bool, needs: list[bool]):
    bsz, c, length = q.shape
    lv = v.shape[2]
    prec = precision(q, tf32)
    bst = _delta(do, q, k, v, stats, scale, prec)
    dq, dk, dv = gradient_buffers((q, k, v), needs)
    bm, bn = tuning.TILES["block_m"], tuning.TILES["block_n"]
    bk, bkv, bdl, bdv = chunk(length), chunk(lv), tile(length, q), tile(lv, v)
    if needs[0]:
        _bwd_dq_kernel[(triton.cdiv(c, bm), triton.cdiv(length, bdl), bsz)](
            q, k, v, do, bst, dq, c, length, lv, scale,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_KV=bkv, BLOCK_DL=bdl,
            PRECISION=prec, num_warps=warps(bdl), num_stages=2,
        )  # fmt: skip
    if needs[1] or needs[2]:  # one kernel writes both from one recomputed pᵀ
        n_tiles = max(triton.cdiv(length, bdl), triton.cdiv(lv, bdv))
        _bwd_dkdv_kernel[(triton.cdiv(c, bn), n_tiles, bsz)](
            q, k, v, do, bst, dk, dv, c, length, lv, scale,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
            BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_KV=bkv, BLOCK_DL=bdl, BLOCK_DV=bdv,
            PRECISION=prec, num_warps=warps(bdl, bdv), num_stages=2,
        )  # fmt: skip
    return dq, dk, dv


@launcher
def _backward_self(do, x, stats, scale: float, tf32: bool, needs: list[bool]):
    bsz, c, length = x.shape
    bst = _delta(do, x, x, x, stats, scale, precision(x, tf32))
    dx = torch.empty_like(x)
    bm, bn, bdl = tuning.TILES["block_m"], tuning.TILES["block_n"], tile(length, x)
    _bwd_self_kernel[(triton.cdiv(c, bn), triton.cdiv(length, bdl), bsz)](
        x, do, bst, dx, c, length, scale,
        *x.stride(), *do.stride(), *dx.stride(),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=chunk(length), BLOCK_DL=bdl,
        PRECISION=precision(x, tf32), num_warps=warps(bdl), num_stages=2,
    )  # fmt: skip
    return dx


def _lse(x, scale: float, prec: str):
    bsz, c, length = x.shape
    lse = torch.empty((bsz, 2, c), device=x.device, dtype=torch.float32)  # [max, log Σ]
    bm = tuning.TILES["block_m"]
    _lse_kernel[(triton.cdiv(c, bm), bsz)](
        x, lse, c, length, scale, *x.stride(),
        BLOCK_M=bm, BLOCK_N=tuning.TILES["block_n"], BLOCK_K=chunk(length), PRECISION=prec,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    return lse


@launcher
def _contrastive_forward(x_a, x_b, eta, scale: float, tf32: bool):
    bsz, c, length = x_a.shape
    prec = precision(x_a, tf32)
    eta32 = eta.float().contiguous()
    lse_a, lse_b = _lse(x_a, scale, prec), _lse(x_b, scale, prec)
    out = torch.empty((bsz, c, length), device=x_a.device, dtype=x_a.dtype)
    bm, bdl = tuning.TILES["block_m"], tile(length, x_a)
    _contrastive_fwd_kernel[(triton.cdiv(c, bm), triton.cdiv(length, bdl), bsz)](
        x_a, x_b, eta32, lse_a, lse_b, out, c, length, scale,
        *x_a.stride(), *x_b.stride(), *out.stride(),
        BLOCK_M=bm, BLOCK_N=tuning.TILES["block_n"], BLOCK_K=chunk(length), BLOCK_DL=bdl,
        PRECISION=prec, num_warps=8 if bdl >= 256 else 4, num_stages=2,
    )  # fmt: skip
    return out, lse_a, lse_b


@launcher
def _contrastive_backward(g, x_a, x_b, eta, lse_a, lse_b, scale: float, tf32: bool, needs):
    # one kernel writes dA and dB: needs only spares the caller the gradients
    bsz, c, length = x_a.shape
    prec = precision(x_a, tf32)
    eta32 = eta.float().contiguous()
    bk = chunk(length)
    delta = torch.empty((bsz, c), device=x_a.device, dtype=torch.float32)
    eps = torch.empty_like(delta)
    bm = tuning.TILES["block_m"]
    _contrastive_rowsum_kernel[(triton.cdiv(c, bm), bsz)](
        x_a, x_b, g, eta32, lse_a, lse_b, delta, eps, c, length, scale,
        *x_a.stride(), *x_b.stride(), *g.stride(),
        BLOCK_M=bm, BLOCK_N=tuning.TILES["block_n"], BLOCK_K=bk, PRECISION=prec,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    da, db = torch.empty_like(x_a), torch.empty_like(x_b)
    tiles = tuning.CONTRASTIVE_BWD_TILES
    bm, bn = tiles["block_m"], tiles["block_n"]
    bdl = tile(length, x_a, tiles["max_tile"])
    _contrastive_bwd_kernel[(triton.cdiv(c, bn), triton.cdiv(length, bdl), bsz)](
        x_a, x_b, g, eta32, lse_a, lse_b, delta, eps, da, db, c, length, scale,
        *x_a.stride(), *x_b.stride(), *g.stride(), *da.stride(), *db.stride(),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_DL=bdl, PRECISION=prec,
        num_warps=8, num_stages=2,
    )  # fmt: skip
    deta = (-eps.sum(dim=1)).to(eta.dtype)  # dη = −Σ_i ε_i
    return da, db, deta


# ----------------------------------------------------------------------------------------------
# Ops (schema, fake and autograd: `custom_op_pair`) and entry points


def _forward_self(x, scale: float, tf32: bool):
    return _forward(x, x, x, scale, tf32)


triton_tiled_cross_fwd, triton_tiled_cross_bwd = custom_op_pair(
    "triton_tiled_cross", ("q", "k", "v"), _forward, _backward, value=2
)
triton_tiled_self_fwd, triton_tiled_self_bwd = custom_op_pair(
    "triton_tiled_self", ("x",), _forward_self, _backward_self
)
triton_tiled_contrastive_fwd, triton_tiled_contrastive_bwd = custom_op_pair(
    "triton_tiled_contrastive",
    ("x_a", "x_b", "eta"),
    _contrastive_forward,
    _contrastive_backward,
    stats=2,
)


def self_attention(x: torch.Tensor, scale: float) -> torch.Tensor:
    """softmax(scale · x xᵀ) x on (B, C, L), one fused gradient for q = k = v."""
    return triton_tiled_self_fwd(x, scale, tf32())[0]


def cross_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float
) -> torch.Tensor:
    """softmax(scale · q kᵀ) v on (B, C, L) q, k and (B, C, Lv) v, result in v's dtype."""
    return triton_tiled_cross_fwd(*one_dtype(q, k, v), scale, tf32())[0].to(v.dtype)


def contrastive_attention(
    x_a: torch.Tensor, x_b: torch.Tensor, eta: torch.Tensor, scale: float
) -> torch.Tensor:
    """|softmax(s X_A X_Aᵀ) − η softmax(s X_B X_Bᵀ)| X_A on (B, C, L), eta (B,); x_a's dtype."""
    a, b = one_dtype(x_a, x_b)
    return triton_tiled_contrastive_fwd(a, b, eta, scale, tf32())[0].to(x_a.dtype)
