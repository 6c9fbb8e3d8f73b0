"""Fused contrastive channel attention |P_A − η P_B| X_A (CIN eq. 5), in Triton.

P_X = softmax(s · X Xᵀ) over channels, X_A, X_B: (B, C, L), η: (B,). Neither C x C matrix is
written. The |·| sits between the softmax and the product, so the online-softmax rescaling trick
does not apply: the forward is two passes, (1) the row log-sum-exp of both softmaxes, (2) the
normalised P_A, P_B recomputed tile by tile and |P_A − η P_B| X_A accumulated. Only the row
log-sum-exps of both (each as a (max, log Σ) pair, (B, 2, C)) are kept for the backward.

Backward (g = dOut, rows i, j, k index channels, W = P_A − η P_B, G = sign(W) with sign(0) = 0,
which is PyTorch's d|u|/du at 0):
    out_i = Σ_j |W_ij| a_j                      ⇒  dA (value path) = |W|ᵀ g
    D_ij  = g_i · a_j,   dW = G ∘ D,   dP_A = dW,   dP_B = −η dW,   dη = −Σ_ij dW_ij P_B,ij
    softmax backward dS = P ∘ (dP − rowsum(P ∘ dP)), with the row sums
        δ_i = Σ_k P_A,ik G_ik D_ik,   ε_i = Σ_k P_B,ik G_ik D_ik
    dS_A = P_A ∘ (G∘D − δ),   dS_B = −η P_B ∘ (G∘D − ε),   dη = −Σ_i ε_i
    logits S = s X Xᵀ  ⇒  dX = s (dS + dSᵀ) X
    dA = |W|ᵀ g + s (dS_A + dS_Aᵀ) A,   dB = s (dS_B + dS_Bᵀ) B
Unlike plain attention, δ is not rowsum(g ∘ out) (out uses |W|, not P_A), so a third pass computes
δ and ε; then one kernel owning rows n of dA and dB uses the symmetry of the logits to get both
dS_mn and dS_nm from one recomputed tile pair.
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
)

# The backward holds ~10 (BLOCK_N x BLOCK_M) fp32 tiles plus two accumulators: smaller blocks.
BWD_TILES = {"block_m": 32, "block_n": 32, "max_tile": 256}


@triton.jit
def _sign(w):
    return tl.where(w > 0, 1.0, tl.where(w < 0, -1.0, 0.0))


@triton.jit
def _stats(S, b, offs, C):
    """(max, log Σ) of rows `offs`: the lse kept as a pair so exp((s − max) − log Σ) stays exact
    when |logits| ~ 1e4 (a single fp32 lse rounds log Σ to ~1e-3)."""
    S += b * 2 * C
    return (
        tl.load(S + offs, mask=offs < C, other=0.0),
        tl.load(S + C + offs, mask=offs < C, other=0.0),
    )


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
def _fwd_kernel(
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
    ma, la = _stats(LSEA, b, offs_m, C)
    mb, lb = _stats(LSEB, b, offs_m, C)
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
def _bwd_rowsum_kernel(
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
    ma, la = _stats(LSEA, b, offs_m, C)
    mb, lb = _stats(LSEB, b, offs_m, C)
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
        gd = _sign(p_a - eta * p_b) * d
        delta += tl.sum(p_a * gd, 1)
        eps += tl.sum(p_b * gd, 1)
    tl.store(DELTA + b * C + offs_m, delta, mask=offs_m < C)
    tl.store(EPS + b * C + offs_m, eps, mask=offs_m < C)


@triton.jit
def _bwd_kernel(
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
    ma_n, la_n = _stats(LSEA, b, offs_n, C)
    mb_n, lb_n = _stats(LSEB, b, offs_n, C)
    delta_n = tl.load(DELTA + b * C + offs_n, mask=offs_n < C, other=0.0)
    eps_n = tl.load(EPS + b * C + offs_n, mask=offs_n < C, other=0.0)

    acc_a = tl.zeros((BLOCK_N, BLOCK_DL), dtype=tl.float32)
    acc_b = tl.zeros((BLOCK_N, BLOCK_DL), dtype=tl.float32)
    for m0 in range(0, C, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        # Padding rows/columns would give exp(0 − lse) = inf with lse ≪ 0: mask both.
        valid = (offs_n[:, None] < C) & (offs_m[None, :] < C)
        ma_m, la_m = _stats(LSEA, b, offs_m, C)
        mb_m, lb_m = _stats(LSEB, b, offs_m, C)
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
        gd_mn = _sign(w_mn) * d_mn
        # rows n
        pa_nm = probs(s_a, ma_n[:, None], la_n[:, None], valid)
        pb_nm = probs(s_b, mb_n[:, None], lb_n[:, None], valid)
        gd_nm = _sign(pa_nm - eta * pb_nm) * d_nm
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
# Launchers


def _lse(x, scale: float, prec: str):
    bsz, c, length = x.shape
    lse = torch.empty((bsz, 2, c), device=x.device, dtype=torch.float32)  # [max, log Σ]
    bm = TILES["block_m"]
    _lse_kernel[(triton.cdiv(c, bm), bsz)](
        x, lse, c, length, scale, *x.stride(),
        BLOCK_M=bm, BLOCK_N=TILES["block_n"], BLOCK_K=chunk(length), PRECISION=prec,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    return lse


def _forward_unguarded(x_a, x_b, eta, scale: float, tf32: bool):
    check_device(x_a, x_b, eta)
    bsz, c, length = x_a.shape
    prec = precision(x_a, tf32)
    eta32 = eta.float().contiguous()
    lse_a, lse_b = _lse(x_a, scale, prec), _lse(x_b, scale, prec)
    out = torch.empty((bsz, c, length), device=x_a.device, dtype=x_a.dtype)
    bm, bdl = TILES["block_m"], tile(length, x_a)
    _fwd_kernel[(triton.cdiv(c, bm), triton.cdiv(length, bdl), bsz)](
        x_a, x_b, eta32, lse_a, lse_b, out, c, length, scale,
        *x_a.stride(), *x_b.stride(), *out.stride(),
        BLOCK_M=bm, BLOCK_N=TILES["block_n"], BLOCK_K=chunk(length), BLOCK_DL=bdl,
        PRECISION=prec, num_warps=8 if bdl >= 256 else 4, num_stages=2,
    )  # fmt: skip
    return out, lse_a, lse_b


def _forward(x_a, x_b, eta, scale: float, tf32: bool):
    with device_guard(x_a):
        return _forward_unguarded(x_a, x_b, eta, scale, tf32)


def _backward_unguarded(g, x_a, x_b, eta, lse_a, lse_b, scale: float, tf32: bool):
    check_device(g, x_a, x_b, eta)
    bsz, c, length = x_a.shape
    prec = precision(x_a, tf32)
    eta32 = eta.float().contiguous()
    bk = chunk(length)
    delta = torch.empty((bsz, c), device=x_a.device, dtype=torch.float32)
    eps = torch.empty_like(delta)
    bm = TILES["block_m"]
    _bwd_rowsum_kernel[(triton.cdiv(c, bm), bsz)](
        x_a, x_b, g, eta32, lse_a, lse_b, delta, eps, c, length, scale,
        *x_a.stride(), *x_b.stride(), *g.stride(),
        BLOCK_M=bm, BLOCK_N=TILES["block_n"], BLOCK_K=bk, PRECISION=prec,
        num_warps=4, num_stages=2,
    )  # fmt: skip
    da, db = torch.empty_like(x_a), torch.empty_like(x_b)
    bm, bn = BWD_TILES["block_m"], BWD_TILES["block_n"]
    bdl = tile(length, x_a, BWD_TILES["max_tile"])
    _bwd_kernel[(triton.cdiv(c, bn), triton.cdiv(length, bdl), bsz)](
        x_a, x_b, g, eta32, lse_a, lse_b, delta, eps, da, db, c, length, scale,
        *x_a.stride(), *x_b.stride(), *g.stride(), *da.stride(), *db.stride(),
        BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, BLOCK_DL=bdl, PRECISION=prec,
        num_warps=8, num_stages=2,
    )  # fmt: skip
    deta = (-eps.sum(dim=1)).to(eta.dtype)  # dη = −Σ_i ε_i
    return da, db, deta


def _backward(g, x_a, x_b, eta, lse_a, lse_b, scale: float, tf32: bool):
    with device_guard(x_a):
        return _backward_unguarded(g, x_a, x_b, eta, lse_a, lse_b, scale, tf32)


# ----------------------------------------------------------------------------------------------
# Custom ops (`fused_op`: schema, fake and autograd) and entry point

contrastive_channel_attention_fwd, contrastive_channel_attention_bwd = fused_op(
    "contrastive_channel_attention", ("x_a", "x_b", "eta"), _forward, _backward, stats=2
)


def contrastive_channel_attention(
    x_a: torch.Tensor, x_b: torch.Tensor, eta: torch.Tensor, scale: float, tf32: bool = False
) -> torch.Tensor:
    """|softmax(s X_A X_Aᵀ) − η softmax(s X_B X_Bᵀ)| X_A on (B, C, L), eta (B,); x_a's dtype."""
    x_a2, x_b2 = one_dtype(x_a, x_b)
    return contrastive_channel_attention_fwd(x_a2, x_b2, eta, scale, tf32)[0].to(x_a.dtype)
